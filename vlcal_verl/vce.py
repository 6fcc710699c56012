"""Visual Certainty Estimation (VCE): KL_t and H_t on the vision span from a masked-image forward.

For each rollout the policy is run again with its image(s) masked (:mod:`vlcal_verl.vce_mask`) over the
same response tokens y. Per response token t (docs/design.md §4):

- ``H_t`` = entropy of p_orig(·|y_<t), the policy's next-token distribution with the original image;
- ``KL_t`` = KL(p_orig ‖ p_masked) over the full vocabulary (``exact``), the sampled-token estimator
  e^d − d − 1 with d = log p_masked(y_t) − log p_orig(y_t) (``k3``), or the authors' estimator
  p_orig(y_t)·clamp(log p_orig(y_t) − log p_masked(y_t), ±20) clamped to [0, 10] (``reference``).

Cost design. Logits at positions ≤ the end of the vision span depend only on the prefix (causal LM), so
the masked forward stops at the batch's last span end (scope ``truncated``) instead of the whole
response (``full``). The lm_head is applied only to the final hidden states of the tokens that need a
distribution, ``vocab_chunk_tokens`` rows at a time, so no [tokens × vocab] fp32 tensor of the response
is ever held. The original distribution comes from the hidden states the plain log-prob forward already
computed (:func:`capture_response_hidden`) or, without them, from a second truncated forward.

Pieces for engines: :func:`token_kl_entropy` (pure, on logits), :func:`chunked_kl_entropy` (on hidden
states), :func:`compute_vce_signals` (model-level driver), :func:`visual_certainty` and
:func:`normalize_visual_certainty` (K̄, H̄, S and the batch-normalised S̃_vis).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vlcal_verl.config import VCEConfig
from vlcal_verl.vce_mask import (
    batch_cell_masks,
    black_row_for,
    images_per_sample,
    mask_pixel_values,
    mask_pixel_values_px,
    pixel_cell_masks,
)

Span = tuple[int, int] | None
ESTIMATORS = ("exact", "k3", "reference")


def token_kl_entropy(
    orig_logits: torch.Tensor,
    masked_logits: torch.Tensor,
    labels: torch.Tensor,
    estimator: str = "exact",
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token KL_t and H_t from two logit rows per token (pure; no chunking).

    Args:
        orig_logits, masked_logits: [N, V] logits with the original / masked image.
        labels: [N] the response tokens y_t (used by ``k3`` and ``reference``).
    Returns:
        (KL_t [N], H_t [N]) in float32, or float64 when the logits are float64.

    >>> z = torch.zeros(2, 4); y = torch.tensor([0, 1])
    >>> [round(v, 4) for v in token_kl_entropy(z, z, y)[1].tolist()]   # uniform over 4: log 4
    [1.3863, 1.3863]
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    dtype = torch.float64 if orig_logits.dtype == torch.float64 else torch.float32
    # Only logsumexps and row dots, no log-softmax tensors (at most ~3 [N, V] floats live):
    #   H_t  = lse_o − p_o·l_o,   KL_t = p_o·(l_o − l_m) + lse_m − lse_o   (Σ p_o = 1)
    lo, lm = _scaled(orig_logits, dtype, temperature), _scaled(masked_logits, dtype, temperature)
    lse_o, lse_m = torch.logsumexp(lo, dim=-1), torch.logsumexp(lm, dim=-1)
    p_o = (lo - lse_o.unsqueeze(-1)).exp_()
    entropy = lse_o - _row_dot(p_o, lo)
    if estimator == "exact":
        kl = _row_dot(p_o, lo - lm) + (lse_m - lse_o)
        return kl.clamp_min(0.0), entropy
    idx = labels.long().unsqueeze(-1)
    lp_o = lo.gather(-1, idx).squeeze(-1) - lse_o  # log p_orig(y_t)
    lp_m = lm.gather(-1, idx).squeeze(-1) - lse_m  # log p_masked(y_t)
    if estimator == "k3":
        d = lp_m - lp_o
        return torch.expm1(d) - d, entropy
    diff = (lp_o - lp_m).clamp(-20.0, 20.0)
    return (lp_o.exp() * diff).clamp(0.0, 10.0), entropy


def _scaled(logits: torch.Tensor, dtype: torch.dtype, temperature: float) -> torch.Tensor:
    x = logits.to(dtype)
    return x if temperature == 1.0 else x / temperature


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_v a[n, v]·b[n, v] → [N] without an [N, V] product tensor."""
    return (a.unsqueeze(-2) @ b.unsqueeze(-1)).reshape(a.shape[:-1])


def chunked_kl_entropy(
    orig_hidden: torch.Tensor,
    masked_hidden: torch.Tensor,
    labels: torch.Tensor,
    lm_head: Callable[[torch.Tensor], torch.Tensor] | None,
    estimator: str = "exact",
    chunk_tokens: int = 256,
    temperature: float = 1.0,
    *,
    masked_head: Callable[[torch.Tensor], torch.Tensor] | str | None = "same",
) -> tuple[torch.Tensor, torch.Tensor]:
    """KL_t and H_t from final hidden states, applying ``lm_head`` to ``chunk_tokens`` rows at a time.

    orig_hidden, masked_hidden: [N, d] hidden states (or [N, V] logits when their head is None);
    labels: [N]. ``masked_head`` defaults to ``lm_head``. Returns (KL_t [N], H_t [N]) float32 (float64
    when the logits are float64). Peak extra memory ≈ 3 × chunk_tokens × V floats, independent of N.
    """
    if orig_hidden.shape[0] != masked_hidden.shape[0] or orig_hidden.shape[0] != labels.shape[0]:
        raise ValueError(
            f"hidden/labels lengths differ: {tuple(orig_hidden.shape)}, "
            f"{tuple(masked_hidden.shape)}, {tuple(labels.shape)}"
        )
    if chunk_tokens <= 0:
        raise ValueError(f"vocab_chunk_tokens must be > 0, got {chunk_tokens}")
    if isinstance(masked_head, str):
        masked_head = lm_head

    def apply(head, x):
        return x if head is None else head(x)

    kls, ents = [], []
    for s in range(0, orig_hidden.shape[0], chunk_tokens):
        sl = slice(s, s + chunk_tokens)
        kl, ent = token_kl_entropy(
            apply(lm_head, orig_hidden[sl]),
            apply(masked_head, masked_hidden[sl]),
            labels[sl],
            estimator,
            temperature,
        )
        kls.append(kl)
        ents.append(ent)
    if not kls:
        empty = orig_hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty.clone()
    return torch.cat(kls), torch.cat(ents)


def spans_to_mask(spans: Sequence[Span], response_mask: torch.Tensor) -> torch.Tensor:
    """Bool [B, R]: token t of sample b is in its vision span [start, end) and a valid response token."""
    b, r = response_mask.shape
    if len(spans) != b:
        raise ValueError(f"spans: need one per sample ({b}), got {len(spans)}")
    out = torch.zeros(b, r, dtype=torch.bool)
    for i, sp in enumerate(spans):
        if sp is not None:
            start, end = int(sp[0]), min(int(sp[1]), r)
            if not 0 <= start <= end:
                raise ValueError(f"spans[{i}] = {sp} is not a half-open [start, end) range")
            out[i, start:end] = True
    return out & response_mask.bool().cpu()


@dataclass
class VCESignals:
    """Per-token VCE signals for a batch of responses.

    kl, entropy: [B, R] float32 KL_t and H_t, 0 where not computed; span_mask: [B, R] vision-span tokens;
    computed_mask: [B, R] tokens with a value (the span for scope 'truncated', the response for 'full');
    has_span: [B] samples with a non-empty vision span.
    """

    kl: torch.Tensor
    entropy: torch.Tensor
    span_mask: torch.Tensor
    computed_mask: torch.Tensor
    has_span: torch.Tensor


def _forward_inputs(model: Any, batch: Mapping[str, Any], n_cols: int, pixel_values: torch.Tensor) -> dict:
    ids = batch["input_ids"][:, :n_cols]
    inputs = {
        "input_ids": ids,
        "attention_mask": batch["attention_mask"][:, :n_cols],
        "pixel_values": pixel_values,
        "image_grid_thw": batch["image_grid_thw"],
    }
    if batch.get("position_ids") is not None:
        inputs["position_ids"] = batch["position_ids"][..., :n_cols]
    if "mm_token_type_ids" in inspect.signature(type(model.model).forward).parameters:
        mm = batch.get("mm_token_type_ids")
        if mm is None:  # 1 = image token, 2 = video token (what Qwen-VL processors return)
            cfg = model.config
            mm = (ids == cfg.image_token_id).int() + 2 * (ids == cfg.video_token_id).int()
        inputs["mm_token_type_ids"] = mm[:, :n_cols]
    return inputs


def final_hidden(model: Any, inputs: Mapping[str, Any]) -> torch.Tensor:
    """Last hidden states [B, L, d] of an HF VLM (``model.model``), without computing logits."""
    return model.model(**inputs, use_cache=False).last_hidden_state


@contextlib.contextmanager
def capture_response_hidden(model: Any, response_len: int) -> Iterator[dict[str, torch.Tensor]]:
    """Keep the final hidden states that predict the response tokens during an ordinary forward.

    Hooks ``model.get_output_embeddings()`` (lm_head); after ``model(**inputs)`` the yielded dict holds
    ``"hidden"`` [B, R, d] with row t = the state predicting response token t (columns L−R−1 … L−2).
    Costs no extra compute: pass it as ``orig_hidden`` to :func:`compute_vce_signals`.
    """
    store: dict[str, torch.Tensor] = {}

    def hook(_module, args):
        h = args[0]
        if h.dim() == 3 and h.shape[1] > response_len:
            n = h.shape[1]
            store["hidden"] = (
                h[:, n - response_len - 1 : n - 1].detach().clone()
            )  # not a view: frees [B, L, d]

    handle = model.get_output_embeddings().register_forward_pre_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def _hidden_rows(model: Any, inputs: Mapping[str, Any], bi: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    return final_hidden(model, inputs)[bi, cols]  # [N, d]


def _logit_rows(model: Any, inputs: Mapping[str, Any], bi: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    first = int(cols.min())
    keep = inputs["input_ids"].shape[1] - first
    logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits  # [B, keep, V]
    return logits[bi, cols - first]  # [N, V]


@torch.no_grad()
def compute_vce_signals(
    model: Any,
    batch: Mapping[str, Any],
    spans: Sequence[Span],
    cfg: VCEConfig,
    *,
    black: torch.Tensor | None = None,
    processor: Any = None,
    orig_hidden: torch.Tensor | None = None,
    temperature: float = 1.0,
    call_root: bool = False,
) -> VCESignals:
    """Masked-image forward → per-token KL_t and H_t (docs/design.md §4).

    Args:
        batch: ``input_ids`` [B, L] = prompt (left-padded) + response (right-padded), ``attention_mask``
            [B, L], ``responses`` [B, R], ``pixel_values`` [rows, C·T·P·P], ``image_grid_thw`` [n_img, 3],
            ``uid`` (B strings, seeds the masks); optional ``response_mask`` [B, R],
            ``mm_token_type_ids`` [B, L], ``position_ids`` [..., B, L].
        spans: per sample the vision span [start, end) in response-token indices, or None.
        black: the black pixel_values row (or give ``processor`` to derive it).
        orig_hidden: [B, R, d] final hidden states with the original image (from
            :func:`capture_response_hidden`); without it a second (truncated) forward computes them.
        call_root: call ``model(...)`` with ``logits_to_keep`` (logits only from the first needed column
            on) instead of ``model.model`` + lm_head on the needed rows — for wrappers such as FSDP whose
            submodules must not be called directly. Costs one [B, window, V] logits tensor.
    """
    if cfg.estimator not in ESTIMATORS or cfg.scope not in ("truncated", "full"):
        raise ValueError(f"vce.estimator/scope invalid: {cfg.estimator!r}, {cfg.scope!r}")
    ids, responses = batch["input_ids"], batch["responses"]
    (bsz, length), r = ids.shape, responses.shape[1]
    prompt_len = length - r
    resp_mask = batch.get("response_mask")
    resp_mask = (batch["attention_mask"][:, prompt_len:] if resp_mask is None else resp_mask).bool().cpu()
    span_mask = spans_to_mask(spans, resp_mask)
    has_span = span_mask.any(-1)
    target = span_mask if cfg.scope == "truncated" else resp_mask & has_span.unsqueeze(-1)
    kl_out = torch.zeros(bsz, r, dtype=torch.float32)
    ent_out = torch.zeros(bsz, r, dtype=torch.float32)
    if not target.any():
        return VCESignals(kl_out, ent_out, span_mask, target, has_span)

    b_idx, t_idx = target.nonzero(as_tuple=True)
    last_t = int(t_idx.max())
    n_cols = prompt_len + last_t  # columns 0 … P+last_t−1: the state predicting token last_t is the last
    if cfg.scope == "full":
        n_cols = length
    vcfg = model.config.vision_config
    merge = vcfg.spatial_merge_size
    if black is None:
        if processor is None:
            raise ValueError("compute_vce_signals needs `black` or `processor` (for the black pixel row)")
        black = black_row_for(processor)
    uids = batch.get("uid")
    if uids is None or len(uids) != bsz:
        raise ValueError(f"batch['uid'] must hold one uid per sample ({bsz}) to seed the masks")
    counts = images_per_sample(ids, batch["image_grid_thw"], model.config.image_token_id, merge)
    grid = batch["image_grid_thw"]
    if cfg.mask_cell_px:
        c, ps = cfg.mask_cell_px, int(vcfg.patch_size)
        masks = pixel_cell_masks(grid, counts, list(uids), cfg.mask_prob, cfg.seed, c, ps)
        masked_pv = mask_pixel_values_px(batch["pixel_values"], grid, masks, c, ps, merge, black)
    else:
        masks = batch_cell_masks(grid, counts, list(uids), cfg.mask_prob, cfg.seed, merge)
        masked_pv = mask_pixel_values(batch["pixel_values"], grid, masks, merge, black)

    dev = ids.device
    cols = (prompt_len + t_idx - 1).to(dev)
    bi = b_idx.to(dev)
    head = model.get_output_embeddings()
    rows = _logit_rows if call_root else _hidden_rows
    h_masked = rows(model, _forward_inputs(model, batch, n_cols, masked_pv), bi, cols)
    masked_head = None if call_root else head
    if orig_hidden is None:
        h_orig = rows(model, _forward_inputs(model, batch, n_cols, batch["pixel_values"]), bi, cols)
        orig_head = masked_head
    else:
        orig_head = head
        if tuple(orig_hidden.shape[:2]) != (bsz, r):
            raise ValueError(
                f"orig_hidden must be [B, R, d] = [{bsz}, {r}, d], got {tuple(orig_hidden.shape)}"
            )
        h_orig = orig_hidden[bi, t_idx.to(orig_hidden.device)].to(h_masked.device)
    labels = responses[b_idx.to(responses.device), t_idx.to(responses.device)].to(dev)
    kl, ent = chunked_kl_entropy(
        h_orig,
        h_masked,
        labels,
        orig_head,
        cfg.estimator,
        cfg.vocab_chunk_tokens,
        temperature,
        masked_head=masked_head,
    )
    kl_out[b_idx, t_idx] = kl.float().cpu()
    ent_out[b_idx, t_idx] = ent.float().cpu()
    return VCESignals(kl_out, ent_out, span_mask, target, has_span)


def visual_certainty(
    kl: torch.Tensor, entropy: torch.Tensor, span_mask: torch.Tensor, cfg: VCEConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample K̄ = mean_V KL_t, H̄ = mean_V H_t and S over the vision span V.

    S = log(K̄+ε) − log(H̄+ε) (signal 'both'), log(K̄+ε) ('kl') or −log(H̄+ε) ('entropy').
    kl, entropy, span_mask: [B, R]. Returns three [B] float64 tensors, NaN where V is empty or the
    span holds a non-finite value.

    >>> kl = torch.tensor([[1.0, 3.0]]); h = torch.tensor([[2.0, 2.0]]); m = torch.ones(1, 2, dtype=torch.bool)
    >>> [round(float(x), 4) for x in visual_certainty(kl, h, m)]
    [2.0, 2.0, 0.0]
    """
    cfg = cfg or VCEConfig()
    m = span_mask.bool()
    kl64, h64 = kl.double().masked_fill(~m, 0.0), entropy.double().masked_fill(~m, 0.0)
    n = m.sum(-1)
    bad = (n == 0) | ~torch.isfinite(kl64).all(-1) | ~torch.isfinite(h64).all(-1)
    denom = n.clamp_min(1).double()
    k_bar, h_bar = kl64.sum(-1) / denom, h64.sum(-1) / denom
    log_k, log_h = torch.log(k_bar.clamp_min(0) + cfg.eps), torch.log(h_bar.clamp_min(0) + cfg.eps)
    if cfg.signal == "both":
        s = log_k - log_h
    elif cfg.signal == "kl":
        s = log_k
    elif cfg.signal == "entropy":
        s = -log_h
    else:
        raise ValueError(f"vce.signal must be 'both', 'kl' or 'entropy', got {cfg.signal!r}")
    nan = torch.full_like(s, float("nan"))
    return (torch.where(bad, nan, k_bar), torch.where(bad, nan, h_bar), torch.where(bad, nan, s))


def normalize_visual_certainty(s: torch.Tensor, min_std: float = 1e-6) -> torch.Tensor:
    """S̃_vis = sigmoid((S − mean_B S) / std_B S) over the finite entries (population std).

    Non-finite entries (no span) stay NaN; std < ``min_std`` (incl. a single sample) gives 0.5.

    >>> [round(float(x), 4) for x in normalize_visual_certainty(torch.tensor([0.0, 2.0, float("nan")]))]
    [0.2689, 0.7311, nan]
    """
    s = s.double()
    valid = torch.isfinite(s)
    out = torch.full_like(s, float("nan"))
    if not valid.any():
        return out
    v = s[valid]
    std = v.std(unbiased=False)
    out[valid] = 0.5 if std < min_std else torch.sigmoid((v - v.mean()) / std)
    return out
