"""Token-level Advantage Reweighting (TAR): sharper penalties on visually uncertain vision tokens.

A rollout with a negative advantage is pushed down on every token. TAR (docs/design.md §5) scales that push
on the tokens of the vision span by how little the token depended on the image: per token
s_t = log(KL_t + ε) − log(H_t + ε), z_t = z-score of s within the sample over the scope (the vision
span, default, or the whole response — the authors' choice), and

    w_t = w_max − (w_max − w_min) · sigmoid(z_t),    A'_t = A_t · w_t  if t ∈ span and A_t < 0, else A_t.

Low certainty (small KL relative to entropy) → w_t near w_max (larger penalty); high certainty → near
w_min (softer penalty). Positive advantages are untouched. The within-sample std is Bessel-corrected
and std < 1e-6 (or a single token) gives z_t = 0, as in the authors' actor.
"""

from __future__ import annotations

import torch

from vlcal_verl.config import TARConfig


def tar_weights(
    kl: torch.Tensor,
    entropy: torch.Tensor,
    scope_mask: torch.Tensor,
    w_min: float = 0.9,
    w_max: float = 1.1,
    eps: float = 1e-8,
    min_std: float = 1e-6,
) -> torch.Tensor:
    """Per-token weights w_t [B, L] (1.0 outside ``scope_mask``).

    kl, entropy: [B, L] KL_t and H_t; scope_mask: [B, L] bool, the tokens whose s_t are z-scored together
    (per sample). Non-finite s_t are left out of the statistics and get weight 1.

    >>> w = tar_weights(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]]), torch.ones(1, 2, dtype=torch.bool))
    >>> [round(float(x), 4) for x in w[0]]   # z = (+0.707, −0.707)
    [0.966, 1.034]
    """
    if kl.shape != entropy.shape or kl.shape != scope_mask.shape:
        raise ValueError(
            f"kl/entropy/scope_mask shapes differ: {tuple(kl.shape)}, "
            f"{tuple(entropy.shape)}, {tuple(scope_mask.shape)}"
        )
    if w_min > w_max:
        raise ValueError(f"tar.w_min ({w_min}) must be <= tar.w_max ({w_max})")
    s = torch.log(kl.double().clamp_min(0) + eps) - torch.log(entropy.double().clamp_min(0) + eps)
    m = scope_mask.bool() & torch.isfinite(s)
    s0 = s.masked_fill(~m, 0.0)
    n = m.sum(-1, keepdim=True)
    mean = s0.sum(-1, keepdim=True) / n.clamp_min(1)
    var = ((s0 - mean) ** 2).masked_fill(~m, 0.0).sum(-1, keepdim=True) / (n - 1).clamp_min(1)
    std = var.sqrt()
    ok = (n > 1) & (std >= min_std)
    z = torch.where(ok, (s0 - mean) / std.clamp_min(min_std), torch.zeros_like(s0))
    w = w_max - (w_max - w_min) * torch.sigmoid(z)
    return torch.where(m, w, torch.ones_like(w)).to(kl.dtype if kl.is_floating_point() else torch.float32)


def apply_tar(
    advantages: torch.Tensor,
    kl: torch.Tensor,
    entropy: torch.Tensor,
    span_mask: torch.Tensor,
    response_mask: torch.Tensor,
    cfg: TARConfig | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """A'_t = A_t · w_t on vision-span tokens with A_t < 0; every other advantage unchanged.

    Args:
        advantages: [B, L] token advantages (e.g. GRPO's, broadcast over the response).
        kl, entropy: [B, L] KL_t and H_t (from :func:`vlcal_verl.vce.compute_vce_signals`); only read
            on the scope's tokens.
        span_mask: [B, L] vision-span tokens; response_mask: [B, L] valid response tokens.
    Returns:
        (new advantages [B, L], stats) with stats ``tar/weight_mean|min|max`` over the reweighted tokens
        (NaN when none) and ``tar/reweighted_fraction`` = reweighted / valid response tokens.
    """
    cfg = cfg or TARConfig()
    if cfg.scope not in ("vision_span", "response"):
        raise ValueError(f"tar.scope must be 'vision_span' or 'response', got {cfg.scope!r}")
    dev = advantages.device
    resp = response_mask.bool().to(dev)
    span = span_mask.bool().to(dev) & resp
    scope = span if cfg.scope == "vision_span" else resp & span.any(-1, keepdim=True)
    w = tar_weights(kl.to(dev), entropy.to(dev), scope, cfg.w_min, cfg.w_max, cfg.eps).to(advantages.dtype)
    apply = span & (advantages < 0)
    new = torch.where(apply, advantages * w, advantages)
    chosen = w[apply].double()
    nan = float("nan")
    stats = {
        "tar/weight_mean": float(chosen.mean()) if chosen.numel() else nan,
        "tar/weight_min": float(chosen.min()) if chosen.numel() else nan,
        "tar/weight_max": float(chosen.max()) if chosen.numel() else nan,
        "tar/reweighted_fraction": float(apply.sum()) / max(int(resp.sum()), 1),
    }
    return new, stats
