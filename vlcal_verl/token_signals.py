"""Per-token signals from sampled-token log-probs, and the authors' perception-token filter.

The trainer has, per response token t, verl's old log-prob log p_old(y_t) and entropy H(p_old) (both
from verl's old-log-prob pass) and, from VCE's masked forward, log p_masked(y_t); with the ``exact``
estimator also the full-vocabulary KL_t. This module turns them into the KL_t / H_t each consumer
reads (docs/design.md §3–§4):

- VCE's S = log(K̄ + ε) − log(H̄ + ε) over the vision span: :func:`vce_token_signals`;
- TAR's s_t over its scope: :func:`tar_token_signals`;
- the perception filter's ranking: :func:`k3_clamped`, then :func:`perception_mask`.

All functions are pure tensor functions on padded ``[B, R]`` tensors.
"""

from __future__ import annotations

import torch

from vlcal_verl.config import TARConfig, VCEConfig

LOG_RATIO_CLAMP = 20.0
KL_CLAMP = 10.0


def k3_clamped(old_logp: torch.Tensor, masked_logp: torch.Tensor) -> torch.Tensor:
    """The authors' per-token KL for TAR and the perception filter: clamp(e^d − d − 1, 0, 10) with
    d = clamp(log p_masked − log p_old, ±20).

    >>> round(float(k3_clamped(torch.tensor([0.0]), torch.tensor([-1.0]))), 6)   # e^-1 − (−1) − 1
    0.367879
    """
    d = (masked_logp.double() - old_logp.double()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return (torch.expm1(d) - d).clamp(0.0, KL_CLAMP).to(old_logp.dtype)


def sampled_kl(old_logp: torch.Tensor, masked_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """VCE's sampled-token KL_t estimators (the ones :func:`vlcal_verl.vce.token_kl_entropy` defines):
    ``k3`` e^d − d − 1 with d = log p_masked − log p_orig; ``reference`` (the authors' VCE estimator)
    p_orig(y)·clamp(log p_orig − log p_masked, ±20), clamped to [0, 10]."""
    lo, lm = old_logp.double(), masked_logp.double()
    if estimator == "k3":
        d = lm - lo
        out = torch.expm1(d) - d
    elif estimator == "reference":
        out = (lo.exp() * (lo - lm).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)).clamp(0.0, KL_CLAMP)
    else:
        raise ValueError(f"sampled_kl: estimator must be 'k3' or 'reference', got {estimator!r}")
    return out.to(old_logp.dtype)


def _entropy(kind: str, old_logp: torch.Tensor, entropy: torch.Tensor | None) -> torch.Tensor:
    if kind == "nll":
        return -old_logp
    if entropy is None:
        raise ValueError("H_t = 'distribution' needs verl's per-token entropy of the old-log-prob pass")
    return entropy


def vce_token_signals(
    cfg: VCEConfig,
    *,
    old_logp: torch.Tensor,
    masked_logp: torch.Tensor | None,
    exact_kl: torch.Tensor | None,
    entropy: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(KL_t, H_t) [B, R] for S: KL_t by ``cfg.estimator`` (``exact``: VCE's full-vocabulary KL;
    ``k3``/``reference``: from the sampled token's two log-probs), H_t by ``cfg.entropy``."""
    if cfg.estimator == "exact":
        if exact_kl is None:
            raise ValueError("vce.estimator='exact' needs the full-vocabulary KL_t of the VCE pass")
        kl = exact_kl
    else:
        if masked_logp is None:
            raise ValueError(f"vce.estimator={cfg.estimator!r} needs the masked log-probs of the VCE pass")
        kl = sampled_kl(old_logp, masked_logp, cfg.estimator)
    return kl, _entropy(cfg.entropy, old_logp, entropy)


def tar_token_signals(
    tar: TARConfig,
    vce: VCEConfig,
    *,
    old_logp: torch.Tensor,
    masked_logp: torch.Tensor | None,
    exact_kl: torch.Tensor | None,
    entropy: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(KL_t, H_t) [B, R] for TAR's s_t: KL_t is VCE's (``tar.kl='vce'``) or :func:`k3_clamped`;
    H_t by ``tar.entropy``."""
    if tar.kl == "k3_clamped":
        if masked_logp is None:
            raise ValueError("tar.kl='k3_clamped' needs the masked log-probs of the VCE pass")
        kl = k3_clamped(old_logp, masked_logp)
    else:
        kl, _ = vce_token_signals(
            vce, old_logp=old_logp, masked_logp=masked_logp, exact_kl=exact_kl, entropy=entropy
        )
    return kl, _entropy(tar.entropy, old_logp, entropy)


def perception_mask(scores: torch.Tensor, response_mask: torch.Tensor, top_fraction: float) -> torch.Tensor:
    """Bool [B, R]: per row, the ⌈top_fraction · n⌉ valid tokens with the largest ``scores``.

    n is the row's number of valid tokens (``response_mask``). Ties are broken by position (the earlier
    token first), so the mask is deterministic; padding is never selected.

    >>> m = perception_mask(torch.tensor([[0.1, 0.9, 0.5, 0.9, 0.0]]), torch.tensor([[1, 1, 1, 1, 0]]), 0.5)
    >>> m.int().tolist()   # n = 4 → k = 2: the two 0.9s
    [[0, 1, 0, 1, 0]]
    """
    if not 0.0 < top_fraction <= 1.0:
        raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
    valid = response_mask.bool()
    n = valid.sum(-1)
    # ⌈f·n⌉ computed in float64 and nudged down, so 0.2·5 = 1.0000000000000002 still gives 1
    k = torch.ceil(n.double() * top_fraction - 1e-9).long().clamp(min=0)
    ranked = scores.double().masked_fill(~valid, float("-inf"))
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return (rank < k.unsqueeze(-1)) & valid
