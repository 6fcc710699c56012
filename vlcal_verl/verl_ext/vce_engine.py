"""VCE through verl 0.9.1's FSDP engine: the masked forward inside verl's own micro-batching.

``compute_vce`` must run on the actor's FSDP shards (the label comes from the current policy,
docs/design.md §6). Rather than copying verl's forward loop, the worker hands verl's engine a prepared batch
and swaps the engine's ``forward_step`` for :func:`vce_forward_step` for the duration of one
``infer_batch`` call (:func:`vce_forward_installed`). verl then does what it always does — eval mode and
parameter offload, dynamic-batch micro-batching, ``no_grad``, re-ordering the per-sample outputs — and
each micro-batch runs two forwards of the same (truncated) sequences: original and masked image.

Why this is the cheap path:

- **Same micro-batch, exact KL.** Both distributions of a token exist at once, so the full-vocabulary
  KL(p_orig ‖ p_masked) needs no stored distributions.
- **Only the rows that matter reach the lm_head.** A forward pre-hook on the output embedding keeps
  only the final hidden states that predict target tokens (:func:`lm_head_rows`), so no
  [tokens × vocab] logits of the sequence exist — only [targets × vocab], then KL_t/H_t in chunks of
  ``vocab_chunk_tokens`` rows (H3's :func:`vlcal_verl.vce.token_kl_entropy`).
- **Truncated sequences.** The vision span opens the response, so with scope ``truncated`` every
  sequence is cut at its span end (:func:`vce_lengths`); verl's dynamic batching packs the shorter
  sequences into fewer micro-batches.

Limits: Ulysses sequence parallel > 1 and fused kernels are refused (both change the hidden-state layout).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

import torch
from tensordict import NonTensorStack, TensorDict

from vlcal_verl.config import VCEConfig
from vlcal_verl.vce_mask import (
    batch_cell_masks,
    mask_internvl_pixel_values,
    mask_pixel_values,
    mask_pixel_values_px,
    pixel_cell_masks,
)
from vlcal_verl.verl_ext.nested import nested_rows

MASKED_MM_KEY = "vce_masked_multi_modal_inputs"
SPAN_FIELD = "vlcal_vision_span"
"""TransferQueue field: [2] int64 (start, end) of the vision span in response tokens, (−1, −1) if none."""


def vce_lengths(
    prompt_lens: torch.Tensor, response_lens: torch.Tensor, spans: torch.Tensor, scope: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sample: forward length and the response-token target range [t_start, t_end).

    Args:
        prompt_lens, response_lens: [B] int; spans: [B, 2] (start, end) in response tokens, −1 = none.
        scope: 'truncated' (targets = the span; the forward stops where the logit predicting the span's
            last token is computed: P + end − 1 tokens) or 'full' (targets = the whole response of every
            sample, span or not — the perception filter ranks every response; forward over P + R tokens).
    Returns:
        (seq_lens [B], t_start [B], t_end [B]); with 'truncated', samples without a span get (P, 0, 0)
        — a prompt-only forward, kept so every DP rank's batch stays aligned.
    """
    if scope not in ("truncated", "full"):
        raise ValueError(f"vce.scope must be 'truncated' or 'full', got {scope!r}")
    p, r = prompt_lens.long(), response_lens.long()
    start, end = spans[:, 0].long(), spans[:, 1].long().minimum(r)
    has = (start >= 0) & (end > start)
    zero = torch.zeros_like(p)
    if scope == "truncated":
        t0, t1 = torch.where(has, start, zero), torch.where(has, end, zero)
        lens = torch.where(has, p + t1 - 1, p)
    else:
        t0, t1 = zero, r
        lens = p + r
    return lens.clamp_min(1), t0, t1


def mask_multi_modal_inputs(
    mm_inputs: Sequence[Any],
    mask_ids: Sequence[str],
    cfg: VCEConfig,
    black: torch.Tensor,
    merge_size: int,
    patch_size: int | None = None,
) -> list[dict | None]:
    """Masked copy of each sample's verl ``multi_modal_inputs`` (pixel_values rows, H3's seeded masks).

    A sample's images are masked with seeds (cfg.seed, mask_ids[b], image index); samples without
    images (None/empty dict) pass through. ``cfg.mask_cell_px`` > 0 masks pixel squares of that size
    (needs ``patch_size``) instead of merged cells.
    """
    if cfg.mask_cell_px and not patch_size:
        raise ValueError("vce.mask_cell_px > 0 needs the vision patch size")
    out: list[dict | None] = []
    for mm, mid in zip(mm_inputs, mask_ids, strict=True):
        mm = getattr(mm, "data", mm)
        if not mm or mm.get("pixel_values") is None:
            out.append(mm)
            continue
        if mm["pixel_values"].ndim == 4:  # InternVL: whole tiles, cells on each tile's merged grid
            if not patch_size:
                raise ValueError("InternVL masking needs the vision patch size")
            c = cfg.mask_cell_px or merge_size * patch_size
            pv = mask_internvl_pixel_values(mm["pixel_values"], mid, cfg.mask_prob, cfg.seed, c, black)
            out.append({**mm, "pixel_values": pv})
            continue
        grid = mm["image_grid_thw"]
        if cfg.mask_cell_px:
            c = cfg.mask_cell_px
            masks = pixel_cell_masks(grid, [grid.shape[0]], [mid], cfg.mask_prob, cfg.seed, c, patch_size)
            pv = mask_pixel_values_px(mm["pixel_values"], grid, masks, c, patch_size, merge_size, black)
        else:
            masks = batch_cell_masks(grid, [grid.shape[0]], [mid], cfg.mask_prob, cfg.seed, merge_size)
            pv = mask_pixel_values(mm["pixel_values"], grid, masks, merge_size, black)
        out.append({**mm, "pixel_values": pv})
    return out


def _nested(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Jagged along each row's last dimension, stated — never inferred (see :mod:`..nested`)."""
    return nested_rows(tensors)


def add_targets(data: TensorDict, spans: torch.Tensor, cfg: VCEConfig) -> torch.Tensor:
    """Write ``vce_t_start`` / ``vce_t_end`` / ``vce_prompt_len`` [B] (in place); return the masked
    forward's length per sample (:func:`vce_lengths`)."""
    prompt_lens = data["prompts"].offsets().diff()
    response_lens = data["responses"].offsets().diff()
    lens, t0, t1 = vce_lengths(prompt_lens, response_lens, spans, cfg.scope)
    data["vce_t_start"], data["vce_t_end"], data["vce_prompt_len"] = t0, t1, prompt_lens.long()
    return lens


def truncated_masked(
    data: TensorDict,
    lens: Sequence[int] | torch.Tensor,
    cfg: VCEConfig,
    black: torch.Tensor,
    merge_size: int,
    mask_ids: Sequence[str],
    patch_size: int | None = None,
) -> TensorDict:
    """A shallow copy of ``data`` with ``input_ids`` / ``position_ids`` cut to ``lens`` and the masked
    multi-modal inputs under :data:`MASKED_MM_KEY`; every other field is kept as is."""
    lens = [int(n) for n in lens]
    out = data.clone(recurse=False)
    out["input_ids"] = _nested([x[:n] for x, n in zip(data["input_ids"].unbind(), lens, strict=True)])
    out["position_ids"] = _nested(
        [x[..., :n] for x, n in zip(data["position_ids"].unbind(), lens, strict=True)]
    )
    mm_field = data.get("multi_modal_inputs", None)
    mm = list(mm_field) if mm_field is not None else [None] * len(lens)
    out[MASKED_MM_KEY] = NonTensorStack(
        *mask_multi_modal_inputs(mm, mask_ids, cfg, black, merge_size, patch_size)
    )
    return out


def prepare_vce_batch(
    data: TensorDict,
    spans: torch.Tensor,
    cfg: VCEConfig,
    black: torch.Tensor,
    merge_size: int,
    mask_ids: Sequence[str],
    patch_size: int | None = None,
) -> TensorDict:
    """verl's per-sample (jagged) batch → the batch the VCE forward step consumes.

    ``input_ids`` / ``position_ids`` are cut to :func:`vce_lengths`; adds ``vce_t_start`` / ``vce_t_end`` /
    ``vce_prompt_len`` [B] and the masked multi-modal inputs. Every other field is kept as is.
    """
    out = data.clone(recurse=False)
    lens = add_targets(out, spans, cfg)
    return truncated_masked(out, lens, cfg, black, merge_size, mask_ids, patch_size)


def pick_rows(h: torch.Tensor, b_idx: torch.Tensor, col: torch.Tensor, remove_padding: bool) -> torch.Tensor:
    """The rows (b_idx, col) of a [1, total, d] packed or [B, L, d] padded hidden/logit tensor (a copy)."""
    return h[0, col.to(h.device)] if remove_padding else h[b_idx.to(h.device), col.to(h.device)]


def target_rows(
    micro_batch: TensorDict, remove_padding: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where the hidden states predicting the target tokens sit in the model's layout.

    Returns (b_idx [N], t_idx [N], pos [N]): sample, response-token index, and the flat row in the
    packed [1, total_tokens] layout (``remove_padding``) or the column in the padded [B, L] layout. The
    logit at position P_b + t − 1 predicts response token t.
    """
    t0, t1 = micro_batch["vce_t_start"].long().cpu(), micro_batch["vce_t_end"].long().cpu()
    p = micro_batch["vce_prompt_len"].long().cpu()
    counts = (t1 - t0).clamp_min(0)
    b_idx = torch.repeat_interleave(torch.arange(len(counts)), counts)
    first = torch.repeat_interleave(t0, counts)
    starts = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    t_idx = first + torch.arange(int(counts.sum())) - starts
    col = p[b_idx] + t_idx - 1
    if remove_padding:
        col = col + micro_batch["input_ids"].offsets().cpu()[b_idx]
    return b_idx, t_idx, col


@contextlib.contextmanager
def lm_head_rows(
    model: Any,
    b_idx: torch.Tensor,
    col: torch.Tensor,
    remove_padding: bool,
    extra: torch.Tensor | None = None,
) -> Iterator[None]:
    """Feed the lm_head only the hidden states at (b_idx, col): logits become [1, N, V]. ``extra``
    [M, d] hidden states are appended (logits [1, N + M, V]): the fused pass's original rows go through
    the head inside the masked forward, where FSDP has its weights gathered."""
    inner = getattr(model, "module", model)
    head = inner.get_output_embeddings()

    def hook(_module, args):
        picked = pick_rows(args[0], b_idx, col, remove_padding)
        if extra is not None:
            picked = torch.cat([picked, extra.to(device=picked.device, dtype=picked.dtype)])
        return (picked.unsqueeze(0), *args[1:])

    handle = head.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _scalar_temperature(micro_batch: TensorDict) -> float:
    t = micro_batch["temperature"]
    t = getattr(t, "data", t)
    if isinstance(t, torch.Tensor):
        if t.numel() and not bool((t == t.flatten()[0]).all()):
            raise NotImplementedError("VCE supports one sampling temperature per batch")
        return float(t.flatten()[0]) if t.numel() else 1.0
    return float(t)


def _like(value: Any, ref: Any) -> Any:
    """``value`` on the device of the original input ``ref`` (non-tensor data may stay on the host)."""
    if isinstance(value, torch.Tensor) and isinstance(ref, torch.Tensor):
        return value.to(device=ref.device, dtype=ref.dtype)
    return value


def _logits(out: Any) -> torch.Tensor:
    logits = out.logits if hasattr(out, "logits") else out["logits"]
    return logits.full_tensor() if hasattr(logits, "full_tensor") else logits  # TP: vocab-sharded DTensor


def needs_original_forward(cfg: VCEConfig) -> bool:
    """Only the full-vocabulary KL needs the original distribution inside the VCE pass: the sampled-token
    estimators and both H_t read verl's old-log-prob pass (``old_log_probs``, ``entropy``)."""
    return cfg.estimator == "exact"


def _chunked(
    lo: torch.Tensor | None, lm: torch.Tensor, labels: torch.Tensor, cfg: VCEConfig, temperature: float
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """(KL_t, H_t, log p_masked(y_t)) over the target rows, ``vocab_chunk_tokens`` rows at a time;
    KL_t and H_t are None without original logits.

    Per chunk: one logsumexp per distribution, one exp, two row dots —
    H_t = lse_o − Σ p_o·l_o and KL_t = Σ p_o·l_o − Σ p_o·l_m + lse_m − lse_o = lse_m − Σ p_o·l_m − H_t
    (as :func:`vlcal_verl.vce.token_kl_entropy`, sharing its terms with log p_masked)."""
    kls, ents, lps = [], [], []
    for s in range(0, lm.shape[0], cfg.vocab_chunk_tokens):
        sl = slice(s, s + cfg.vocab_chunk_tokens)
        m = _scaled_float(lm[sl], temperature)
        lse_m = m.logsumexp(-1)
        lps.append((m.gather(-1, labels[sl].long().unsqueeze(-1)).squeeze(-1) - lse_m).float())
        if lo is not None:
            o = _scaled_float(lo[sl], temperature)
            lse_o = o.logsumexp(-1)
            p_o = (o - lse_o.unsqueeze(-1)).exp_()
            ent = lse_o - _row_dot(p_o, o)
            kl = lse_m - _row_dot(p_o, m) - ent
            kls.append(kl.clamp_min(0.0).float())
            ents.append(ent.float())
    empty = torch.zeros(0, dtype=torch.float32, device=lm.device)
    masked = torch.cat(lps) if lps else empty
    if lo is None:
        return None, None, masked
    return (torch.cat(kls), torch.cat(ents), masked) if kls else (empty, empty.clone(), masked)


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.unsqueeze(-2) @ b.unsqueeze(-1)).reshape(a.shape[:-1])


def _scaled_float(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    x = logits.double() if logits.dtype == torch.float64 else logits.float()
    return x if temperature == 1.0 else x / temperature


def masked_pass(
    engine: Any, micro_batch: TensorDict, cfg: VCEConfig, device: Any, orig_hidden: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """The masked forward of one prepared micro-batch (truncated ids, masked multi-modal inputs,
    ``vce_t_*`` targets) → ``vce_masked_logp`` and, for the ``exact`` estimator, ``vce_kl`` /
    ``vce_entropy``, jagged [B, R_b] float32 (0 off target tokens).

    The exact KL needs the original distribution of the target rows: from ``orig_hidden`` [N, d] (the
    final hidden states verl's own forward computed, kept by the fused pass; they join the masked rows in
    one LM-head call), else from an original forward of the same truncated sequences run here.
    """
    if getattr(engine, "use_ulysses_sp", False):
        raise NotImplementedError("VCE needs ulysses_sequence_parallel_size == 1")
    from verl.utils import tensordict_utils as tu
    from verl.utils.model import extract_multi_modal_inputs

    micro_batch = micro_batch.to(device)
    remove_padding = bool(tu.get_non_tensor_data(data=micro_batch, key="use_remove_padding", default=True))
    if tu.get_non_tensor_data(data=micro_batch, key="use_fused_kernels", default=False):
        raise NotImplementedError("VCE needs use_fused_kernels=False (it reads the lm_head's logits)")
    model_inputs, _ = engine.prepare_model_inputs(micro_batch=micro_batch)
    masked_mm = extract_multi_modal_inputs(list(micro_batch[MASKED_MM_KEY]))
    masked_inputs = {**model_inputs, **{k: _like(v, model_inputs.get(k)) for k, v in masked_mm.items()}}
    b_idx, t_idx, col = target_rows(micro_batch, remove_padding)
    # Every forward runs even when this micro-batch has no targets: FSDP's all-gathers are collective, and
    # every DP rank must run the same number of forwards (verl aligns micro-batch counts across ranks).
    extra = orig_hidden if needs_original_forward(cfg) else None
    with torch.no_grad(), _autocast(engine, device):
        lo = None
        if extra is None and needs_original_forward(cfg):
            with lm_head_rows(engine.module, b_idx, col, remove_padding):
                lo = _logits(engine.module(**model_inputs, use_cache=False))[0]
        with lm_head_rows(engine.module, b_idx, col, remove_padding, extra=extra):
            lm = _logits(engine.module(**masked_inputs, use_cache=False))[0]
        if extra is not None:
            lm, lo = lm[: len(b_idx)], lm[len(b_idx) :]
    responses = micro_batch["responses"]
    labels = responses.values()[responses.offsets()[b_idx.to(responses.device)] + t_idx.to(responses.device)]
    kl, ent, masked_logp = _chunked(lo, lm, labels.to(lm.device), cfg, _scalar_temperature(micro_batch))
    r_lens = responses.offsets().diff().cpu().tolist()

    def rows(values: torch.Tensor) -> torch.Tensor:
        pad = torch.zeros(len(r_lens), max(r_lens, default=0), dtype=torch.float32)
        pad[b_idx, t_idx] = values.cpu()
        return _nested([pad[i, :n] for i, n in enumerate(r_lens)])

    out = {"vce_masked_logp": rows(masked_logp)}
    if kl is not None:
        out |= {"vce_kl": rows(kl), "vce_entropy": rows(ent)}
    return out


def _autocast(engine: Any, device: Any) -> Any:
    dtype = getattr(engine, "_autocast_dtype", torch.float32)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    dev_type = torch.device(device).type if not isinstance(device, int) else "cuda"
    return torch.autocast(device_type=dev_type, dtype=dtype)


def _default_device(device: Any) -> Any:
    if device is not None:
        return device
    from verl.utils.device import get_device_id

    return get_device_id()


def vce_forward_step(
    engine: Any,
    micro_batch: TensorDict,
    loss_function: Any = None,
    forward_only: bool = True,
    *,
    cfg: VCEConfig,
    device: Any = None,
) -> tuple[torch.Tensor, dict]:
    """Drop-in for ``FSDPEngineWithLMHead.forward_step`` on a :func:`prepare_vce_batch` batch: the masked
    forward (and, for the ``exact`` estimator, the original one) → :func:`masked_pass`'s fields.

    Returns verl's (loss, output) pair; verl concatenates and re-orders ``output["model_output"]``.
    """
    device = _default_device(device)
    model_output = masked_pass(engine, micro_batch, cfg, device)
    output = {"model_output": model_output, "loss": 0.0, "metrics": {}}
    return torch.zeros((), device=model_output["vce_masked_logp"].device), output


@contextlib.contextmanager
def vce_forward_installed(engine: Any, cfg: VCEConfig, device: Any = None) -> Iterator[None]:
    """Make ``engine.forward_step`` the VCE step for one call (instance attribute; class untouched).

    ``device``: where micro-batches go (default: verl's current accelerator, as the engine's own step)."""
    engine.forward_step = partial(vce_forward_step, engine, cfg=cfg, device=device)
    try:
        yield
    finally:
        del engine.forward_step
