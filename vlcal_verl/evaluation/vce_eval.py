"""``vlcal eval --vce``: each item's K̄, H̄, S and S̃_vis with the VCE code training uses.

The generated response ids and the item's prompt and images go through :func:`vlcal_verl.vce_batch.
build_vce_batch` (verl's [prompt | response] layout), the vision span is found on the ids
(:func:`vlcal_verl.spans.vision_token_spans`), and :func:`vlcal_verl.vce.compute_vce_signals` runs the
seeded masked-image forward (masks seeded by (``VCEConfig.seed``, uid, image index), as in training);
:func:`vlcal_verl.vce.visual_certainty` gives K̄, H̄ and S per item. S̃_vis is
:func:`vlcal_verl.vce.normalize_visual_certainty` over the items of one benchmark (training normalises
over a batch), see :func:`normalize_per_group`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tqdm import tqdm


def vce_scores(
    model: Any,
    processor: Any,
    items: Sequence[Any],
    response_ids: Sequence[Sequence[int]],
    *,
    protocol: str = "decoupled",
    cfg: Any = None,
    batch_size: int = 8,
    temperature: float = 1.0,
) -> list[dict[str, float | None]]:
    """Per item ``{"k_bar", "h_bar", "s"}`` (None where the response has no vision span).

    ``temperature`` scales the logits as in training's VCE (the rollout temperature; 1.0 in the recipes).
    """
    import math

    import torch

    from vlcal_verl.config import VCEConfig
    from vlcal_verl.evaluation.generate import _images, _prompt_text
    from vlcal_verl.evaluation.hf_generate import special_ids
    from vlcal_verl.spans import vision_token_spans
    from vlcal_verl.vce import compute_vce_signals, visual_certainty
    from vlcal_verl.vce_batch import build_vce_batch
    from vlcal_verl.vce_mask import black_row_for

    if len(items) != len(response_ids):
        raise ValueError(f"items ({len(items)}) and response_ids ({len(response_ids)}) differ in length")
    cfg = cfg or VCEConfig()
    eos, pad, _ = special_ids(processor.tokenizer)
    black = black_row_for(processor)
    model.eval()
    out: list[dict[str, float | None]] = []
    with tqdm(total=len(items), desc="vce", unit="item") as bar:
        for start in range(0, len(items), batch_size):
            chunk, ids = items[start : start + batch_size], response_ids[start : start + batch_size]
            spans = vision_token_spans([list(r) for r in ids], processor.tokenizer, stop_ids={eos, pad})
            if any(sp is not None for sp in spans):
                batch = build_vce_batch(
                    processor,
                    [_prompt_text(processor, it, protocol) for it in chunk],
                    [_images(it) for it in chunk],
                    [list(r) for r in ids],
                    [str(it.uid) for it in chunk],
                )
                sig = compute_vce_signals(model, batch, spans, cfg, black=black, temperature=temperature)
                k_bar, h_bar, s = visual_certainty(sig.kl, sig.entropy, sig.span_mask, cfg)
            else:  # no span in the chunk: nothing to run
                k_bar = h_bar = s = torch.full((len(chunk),), float("nan"), dtype=torch.float64)
            for k, h, v in zip(k_bar.tolist(), h_bar.tolist(), s.tolist(), strict=True):
                out.append(
                    {
                        name: (x if math.isfinite(x) else None)
                        for name, x in (("k_bar", k), ("h_bar", h), ("s", v))
                    }
                )
            bar.update(len(chunk))
    return out


def normalize_per_group(s: Sequence[float | None], groups: Sequence[str]) -> list[float | None]:
    """S̃_vis: :func:`vlcal_verl.vce.normalize_visual_certainty` of S within each group (benchmark);
    None stays None."""
    import math

    import torch

    from vlcal_verl.vce import normalize_visual_certainty

    out: list[float | None] = [None] * len(s)
    for g in dict.fromkeys(groups):
        idx = [i for i, name in enumerate(groups) if name == g]
        vals = torch.tensor([math.nan if s[i] is None else float(s[i]) for i in idx], dtype=torch.float64)
        for i, v in zip(idx, normalize_visual_certainty(vals).tolist(), strict=True):
            out[i] = v if math.isfinite(v) else None
    return out
