"""Self-check of ``compute_vce``'s masked pass on a tiny Qwen3-VL (CPU tests, the GPU check script).

:func:`tiny_verl_batch` builds the per-sample (jagged) batch verl's TransferQueue hands the actor worker;
:func:`run_engine_vce` runs it through a verl FSDP engine with :func:`vce_forward_installed`;
:func:`brute_force_vce` recomputes KL_t / H_t from full logits in float64 for comparison.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tensordict import NonTensorStack, TensorDict

from vlcal_verl.config import VCEConfig
from vlcal_verl.spans import vision_token_spans
from vlcal_verl.vce_mask import batch_cell_masks, black_row_for, mask_pixel_values
from vlcal_verl.verl_ext.vce_engine import prepare_vce_batch, vce_forward_installed

DEFAULT_RESPONSES = (
    "<think><vision> a red circle </vision><reasoning> red </reasoning></think> \\boxed{red}",
    "<think><vision> two blue squares on the left side </vision></think> \\boxed{2}",
    "no protocol at all \\boxed{3}",
)


def tiny_verl_batch(
    model: Any, processor: Any, responses: Sequence[str] = DEFAULT_RESPONSES, seed: int = 0
) -> tuple[TensorDict, list[dict], torch.Tensor, list[str]]:
    """(batch, rows, spans [B, 2], mask ids) for one random image per sample and the given responses."""
    from PIL import Image

    tok = processor.tokenizer
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    rows = []
    for i, resp_text in enumerate(responses):
        pixels = np.random.default_rng(seed + i).random((64, 96 + 32 * (i % 3), 3)) * 255
        enc = processor(text=[text], images=[Image.fromarray(pixels.astype("uint8"))], return_tensors="pt")
        prompt, resp = (
            enc["input_ids"][0],
            torch.tensor(tok(resp_text, add_special_tokens=False)["input_ids"]),
        )
        ids = torch.cat([prompt, resp])
        mm_tt = (ids == model.config.image_token_id).int()[None]
        vis, _ = model.model.get_rope_index(
            ids[None], mm_tt, enc["image_grid_thw"], attention_mask=torch.ones_like(ids)[None]
        )
        rows.append(
            {
                "prompts": prompt,
                "responses": resp,
                "input_ids": ids,
                "position_ids": torch.cat([torch.arange(len(ids))[None], vis[:, 0]], 0),
                "mm": {"pixel_values": enc["pixel_values"], "image_grid_thw": enc["image_grid_thw"]},
            }
        )
    nested = {
        k: torch.nested.as_nested_tensor([r[k] for r in rows], layout=torch.jagged)
        for k in ("prompts", "responses", "input_ids", "position_ids")
    }
    nested["loss_mask"] = torch.nested.as_nested_tensor(
        [torch.ones_like(r["responses"]) for r in rows], layout=torch.jagged
    )
    mask_ids = [f"uid{i // 2}_{i % 2}" for i in range(len(rows))]
    data = TensorDict(
        {**nested, "multi_modal_inputs": NonTensorStack(*[r["mm"] for r in rows])}, batch_size=len(rows)
    )
    spans = vision_token_spans([r["responses"].numpy() for r in rows], tok)
    return data, rows, torch.tensor([list(s) if s else [-1, -1] for s in spans]), mask_ids


def bare_engine(model: Any, autocast_dtype: torch.dtype = torch.float32) -> Any:
    """verl's ``FSDPEngineWithLMHead`` around an unwrapped module on one rank: verl's own micro-batching,
    ``prepare_model_inputs``, ``forward_step`` and ``prepare_model_outputs`` without building FSDP (the
    tests' and the benchmark's engine). Set what ``__init__`` would (no torch.compile)."""
    from types import SimpleNamespace

    from verl.utils import torch_functional as verl_F
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    eng = object.__new__(FSDPEngineWithLMHead)
    eng.module, eng.pad_to_length, eng.use_ulysses_sp = model, False, False
    eng.ulysses_sequence_parallel_size, eng._autocast_dtype = 1, autocast_dtype
    eng.get_data_parallel_group = lambda: None
    eng.engine_config = SimpleNamespace(
        entropy_checkpointing=False,
        entropy_from_logits_with_chunking=False,
        entropy_from_logits_chunk_size=2048,
    )
    eng.compute_entropy_from_logits = verl_F.entropy_from_logits
    return eng


def run_engine_vce(
    engine: Any,
    processor: Any,
    data: TensorDict,
    spans: torch.Tensor,
    mask_ids: list[str],
    cfg: VCEConfig,
    device: Any,
    remove_padding: bool = False,
) -> dict[str, torch.Tensor]:
    """``compute_vce``'s path: prepare → verl ``engine.infer_batch`` with the VCE forward step."""
    from verl.utils import tensordict_utils as tu

    merge = int(getattr(getattr(processor, "image_processor", processor), "merge_size", 2))
    prepared = prepare_vce_batch(data, spans, cfg, black_row_for(processor), merge, mask_ids)
    tu.assign_non_tensor(
        prepared,
        use_remove_padding=remove_padding,
        use_dynamic_bsz=True,
        temperature=1.0,
        max_token_len_per_gpu=int(prepared["input_ids"].offsets().diff().max()) + 1,
    )
    with vce_forward_installed(engine, cfg, device=device):
        return engine.infer_batch(prepared, loss_function=None)["model_output"]


@torch.no_grad()
def brute_force_vce(
    model: Any, processor: Any, rows: list[dict], spans: torch.Tensor, mask_ids: list[str], cfg: VCEConfig
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Exact KL(p_orig ‖ p_masked) and H(p_orig) in float64 from full logits at every span token."""
    black, dev = black_row_for(processor), next(model.parameters()).device
    kls, ents = [], []
    for r, (s, e), mid in zip(rows, spans.tolist(), mask_ids, strict=True):
        n = len(r["responses"])
        kl, h = torch.zeros(n), torch.zeros(n)
        if s >= 0:
            mm = r["mm"]
            masks = batch_cell_masks(mm["image_grid_thw"], [1], [mid], cfg.mask_prob, cfg.seed, 2)
            masked = mask_pixel_values(mm["pixel_values"], mm["image_grid_thw"], masks, 2, black)
            kw = {
                "input_ids": r["input_ids"][None].to(dev),
                "position_ids": r["position_ids"][:, None].to(dev),
                "image_grid_thw": mm["image_grid_thw"].to(dev),
            }
            lo = model(**kw, pixel_values=mm["pixel_values"].to(dev)).logits[0].double().log_softmax(-1)
            lm = model(**kw, pixel_values=masked.to(dev)).logits[0].double().log_softmax(-1)
            p = len(r["prompts"])
            rows_o, rows_m = lo[p + s - 1 : p + e - 1], lm[p + s - 1 : p + e - 1]
            kl[s:e] = (rows_o.exp() * (rows_o - rows_m)).sum(-1).float().cpu()
            h[s:e] = (-(rows_o.exp() * rows_o).sum(-1)).float().cpu()
        kls.append(kl)
        ents.append(h)
    return kls, ents
