"""The trainer's new steps as pure batch functions: tensors in, tensors (and metrics) out.

verl's V1 trainer keeps the rollout batch in TransferQueue as per-sample (jagged) tensors; the trainer
subclass (:mod:`vlcal_verl.verl_ext.trainer`) only moves fields in and out of it. Everything that is
VL-Calibration lives here, so it is tested on CPU without Ray, workers or TransferQueue:

- :func:`visual_reward_step` — K̄, H̄, S per sample, S̃_vis over the **global** batch (padding rows
  left out), R ← R + w_vis·(−(c_v − S̃_vis)²) (H1's ``add_visual_term``), written onto the token-level
  reward at the last response token (where verl's agent loop puts the sample reward).
- :func:`tar_step` — TAR on the GRPO advantages (H3's ``apply_tar``).
- :func:`calibration_step_metrics` — parse rate, accuracy, mean c_v / c_r / Φ, batch ECE / AUROC.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from vlcal_verl.config import TARConfig, VCEConfig
from vlcal_verl.metrics import calibration_metrics
from vlcal_verl.rewards import add_visual_term
from vlcal_verl.tar import apply_tar
from vlcal_verl.vce import normalize_visual_certainty, visual_certainty

Span = tuple[int, int] | None


def spans_to_tensor(spans: Sequence[Span]) -> torch.Tensor:
    """[B, 2] int64 (start, end) per sample, (−1, −1) for "no vision span" (TransferQueue-friendly)."""
    return torch.tensor([list(s) if s is not None else [-1, -1] for s in spans], dtype=torch.int64).reshape(
        -1, 2
    )


def tensor_to_spans(t: torch.Tensor) -> list[Span]:
    """Inverse of :func:`spans_to_tensor`."""
    return [None if int(a) < 0 else (int(a), int(b)) for a, b in t.tolist()]


def span_mask_from_tensor(spans: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Bool [B, R]: token t of sample b is in [start_b, end_b) and a valid response token."""
    r = response_mask.shape[1]
    pos = torch.arange(r).unsqueeze(0)
    start, end = spans[:, :1], spans[:, 1:]
    return (pos >= start) & (pos < end) & (start >= 0) & response_mask.bool().cpu()


def reward_positions(
    response_mask: torch.Tensor, response_lengths: torch.Tensor | None = None
) -> torch.Tensor:
    """[B] column of each sample's reward token in the padded ``[B, R]`` layout (−1: empty response).

    With ``response_lengths`` (the jagged row lengths): ``length − 1``, verl's ``rm_scores[-1]``.
    Without: the last column where ``response_mask`` is 1.
    """
    if response_lengths is not None:
        return response_lengths.long().cpu() - 1
    mask = response_mask.bool().cpu()
    cols = torch.arange(mask.shape[1]).expand_as(mask)
    return torch.where(mask, cols, torch.full_like(cols, -1)).max(dim=-1).values


def _finite_stats(prefix: str, x: torch.Tensor) -> dict[str, float]:
    v = x[torch.isfinite(x)].double()
    if v.numel() == 0:
        return {f"{prefix}/mean": math.nan, f"{prefix}/std": math.nan}
    return {
        f"{prefix}/mean": float(v.mean()),
        f"{prefix}/std": float(v.std(unbiased=False)),
        f"{prefix}/min": float(v.min()),
        f"{prefix}/max": float(v.max()),
    }


def visual_reward_step(
    token_scores: torch.Tensor,
    response_mask: torch.Tensor,
    c_v: Sequence[float | None],
    kl: torch.Tensor,
    entropy: torch.Tensor,
    span_mask: torch.Tensor,
    *,
    w_vis: float,
    vce_cfg: VCEConfig | None = None,
    valid: torch.Tensor | None = None,
    response_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Add the batch-level visual calibration term to the token-level rewards.

    Args:
        token_scores: [B, R] token-level rewards (verl's ``rm_scores``; the sample reward sits on its last
            response token). response_mask: [B, R].
        c_v: B visual confidences in [0, 1] (None when unparsed).
        kl, entropy, span_mask: [B, R] KL_t, H_t and the vision-span tokens.
        valid: [B] bool, rows that take part (False for verl's padding rows); default all.
        response_lengths: [B] length of each sample's (jagged) response row. verl's agent loop puts the
            sample reward on the row's last position, ``rm_scores[-1]``, which is not the last *unmasked*
            token once masked (tool / multi-turn) tokens end a response; the visual term goes there too.
            Default: the last position where ``response_mask`` is 1.
    Returns:
        (new token-level rewards [B, R], S̃_vis [B] float64 with NaN where no span/invalid, metrics).
        Invalid rows are returned unchanged.
    """
    vce_cfg = vce_cfg or VCEConfig()
    b = token_scores.shape[0]
    valid = torch.ones(b, dtype=torch.bool) if valid is None else valid.bool().cpu()
    if len(c_v) != b or valid.shape != (b,):
        raise ValueError(f"visual_reward_step: c_v ({len(c_v)}) and valid {tuple(valid.shape)} need B = {b}")
    k_bar, h_bar, s = visual_certainty(kl.cpu(), entropy.cpu(), span_mask.cpu(), vce_cfg)
    s = torch.where(valid, s, torch.full_like(s, math.nan))
    s_tilde = normalize_visual_certainty(s)

    last = reward_positions(response_mask, response_lengths)
    if bool((last[valid] < 0).any()):
        raise ValueError("visual_reward_step: a valid sample has an empty response")
    scores = token_scores.sum(-1)
    new_scores = add_visual_term(scores, list(c_v), s_tilde.to(scores.dtype), w_vis)
    delta = torch.where(valid.to(scores.device), new_scores - scores, torch.zeros_like(scores))
    out = token_scores.clone()
    rows = torch.arange(b, device=out.device)
    out[rows, last.clamp_min(0).to(out.device)] += delta

    metrics = {"vce/span_rate": float((torch.isfinite(s) & valid).sum()) / max(int(valid.sum()), 1)}
    metrics.update(_finite_stats("vce/k_bar", k_bar[valid]))
    metrics.update(_finite_stats("vce/h_bar", h_bar[valid]))
    metrics.update(_finite_stats("vce/s", s))
    metrics.update(_finite_stats("vce/s_tilde", s_tilde))
    metrics["vce/visual_term_mean"] = (
        float(delta[valid.to(delta.device)].double().mean()) / w_vis if w_vis else 0.0
    )
    return out, s_tilde, metrics


def tar_step(
    advantages: torch.Tensor,
    kl: torch.Tensor,
    entropy: torch.Tensor,
    span_mask: torch.Tensor,
    response_mask: torch.Tensor,
    tar_cfg: TARConfig | None = None,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """TAR on token advantages [B, R] (H3's :func:`vlcal_verl.tar.apply_tar`); invalid rows untouched."""
    span = span_mask.bool()
    if valid is not None:
        span = span & valid.bool().cpu().unsqueeze(-1).to(span.device)
    return apply_tar(advantages, kl, entropy, span, response_mask, tar_cfg)


def _num(x: Any) -> float | None:
    if x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def calibration_step_metrics(infos: Sequence[Mapping[str, Any]], prefix: str = "calib") -> dict[str, float]:
    """Per-step calibration metrics from the reward components of each sample.

    ``infos``: one dict per sample with the keys of :data:`vlcal_verl.rewards.REWARD_COMPONENT_KEYS`
    (``accuracy``, ``parse_ok``, ``confidence`` Φ, ``vision_confidence`` c_v, ``reasoning_confidence``
    c_r). ECE / AUROC are over the whole batch with an unparsed Φ counted as 0 (the Brier term's view).
    """
    if not infos:
        return {}
    acc = np.array([_num(i.get("accuracy")) or 0.0 for i in infos], dtype=np.float64)
    parsed = np.array([bool(i.get("parse_ok")) for i in infos])
    out: dict[str, float] = {
        f"{prefix}/parse_rate": float(parsed.mean()),
        f"{prefix}/accuracy": float(acc.mean()),
    }
    for key, name in (("vision_confidence", "c_v"), ("reasoning_confidence", "c_r"), ("confidence", "phi")):
        vals = [v for v in (_num(i.get(key)) for i in infos) if v is not None]
        out[f"{prefix}/{name}_mean"] = float(np.mean(vals)) if vals else math.nan
    conf = np.array([min(max(_num(i.get("confidence")) or 0.0, 0.0), 1.0) for i in infos])
    cm = calibration_metrics(conf, (acc > 0.5).astype(np.float64))
    out[f"{prefix}/ece"] = float(cm["ece"])
    out[f"{prefix}/auroc"] = math.nan if cm["auroc"] is None else float(cm["auroc"])
    out[f"{prefix}/brier"] = float(cm["brier"])
    return out
