"""Typed configuration for the ``vlcal:`` block.

Both engines (verl and local) and the reward server read these dataclasses; Hydra/OmegaConf YAML
composes them (``OmegaConf.structured``), so a typo in a recipe is an error, not a silent default.
Defaults are the authors' (docs/design.md §3-§6).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

ProtocolName = Literal["decoupled", "rlcr"]
KLEstimator = Literal["exact", "k3", "reference"]
VCEScope = Literal["truncated", "full"]
VCESignal = Literal["both", "kl", "entropy"]
TARScope = Literal["vision_span", "response"]


@dataclass
class RewardConfig:
    """Weights of R = I + w_brier·(−(Φ − I)²) + w_fmt·F + w_vis·(−(c_v − S̃_vis)²)."""

    w_brier: float = 2.0
    """Weight of the Brier term on the overall confidence Φ."""
    w_fmt: float = 0.4
    """Weight of the format indicator F."""
    w_vis: float = 0.4
    """Weight of the visual-calibration term (needs VCE; 0 disables it)."""
    protocol: ProtocolName = "decoupled"
    """'decoupled' (c_v and c_r) or 'rlcr' (one confidence, the baseline)."""
    reference_parity: bool = False
    """Reproduce the authors' decouple reward exactly (their stricter parsing)."""
    grading_timeout_s: float = 5.0
    """Per-answer grading timeout; a timeout is graded incorrect with status 'timeout'."""


@dataclass
class VCEConfig:
    """Visual Certainty Estimation: masked-image forward, KL_t and H_t on the vision span."""

    enabled: bool = True
    """Run VCE and add the visual reward term."""
    mask_prob: float = 0.8
    """Probability p that a merged-patch cell is blacked out."""
    seed: int = 0
    """Base seed; masks are seeded by (seed, uid, image index)."""
    estimator: KLEstimator = "exact"
    """'exact' full-vocab KL(p_orig‖p_masked), 'k3' e^d−d−1, or the authors' 'reference'."""
    scope: VCEScope = "truncated"
    """'truncated' stops the masked forward at the vision span's end; 'full' runs the whole response."""
    signal: VCESignal = "both"
    """S = log K̄ − log H̄ ('both'), log K̄ only ('kl'), or −log H̄ only ('entropy') — the paper's ablations."""
    vocab_chunk_tokens: int = 256
    """Tokens per chunk when computing exact KL over the full vocabulary."""
    eps: float = 1e-8
    """ε in log(K̄ + ε) − log(H̄ + ε)."""


@dataclass
class TARConfig:
    """Token-level Advantage Reweighting of negative advantages on vision tokens."""

    enabled: bool = True
    """Apply TAR after GRPO advantages."""
    w_min: float = 0.9
    """Weight for the most visually certain tokens (softer penalty)."""
    w_max: float = 1.1
    """Weight for the least visually certain tokens (larger penalty)."""
    scope: TARScope = "vision_span"
    """Z-score s_t over the vision span (default) or the whole response (authors; needs VCE scope 'full')."""
    eps: float = 1e-8
    """ε in s_t = log(KL_t + ε) − log(H_t + ε)."""


def _cast(cls: type, section: str, name: str, value: Any) -> Any:
    """YAML 1.1 reads ``1e-3`` as a string: cast strings for float/int fields, naming the field on error."""
    default = cls.__dataclass_fields__[name].default
    if isinstance(value, str) and isinstance(default, int | float) and not isinstance(default, bool):
        try:
            return type(default)(float(value)) if isinstance(default, float) else int(value)
        except ValueError:
            raise ValueError(f"vlcal.{section}.{name} must be a number, got {value!r}") from None
    return value


@dataclass
class VLCalConfig:
    """The ``vlcal:`` block shared by the verl trainer, the local engine and the reward server."""

    reward: RewardConfig = field(default_factory=RewardConfig)
    vce: VCEConfig = field(default_factory=VCEConfig)
    tar: TARConfig = field(default_factory=TARConfig)
    reward_server_url: str | None = None
    """When set, per-sample rewards come from this reward server instead of in-process scoring."""

    def validate(self) -> VLCalConfig:
        """Raise ValueError naming the field when a combination is invalid; return self."""
        r, v, t = self.reward, self.vce, self.tar
        if not 0.0 <= v.mask_prob <= 1.0:
            raise ValueError(f"vlcal.vce.mask_prob must be in [0, 1], got {v.mask_prob}")
        if t.w_min > t.w_max:
            raise ValueError(f"vlcal.tar.w_min ({t.w_min}) must be <= vlcal.tar.w_max ({t.w_max})")
        if t.enabled and not v.enabled:
            raise ValueError("vlcal.tar.enabled needs vlcal.vce.enabled (TAR uses KL_t and H_t)")
        if t.enabled and t.scope == "response" and v.scope != "full":
            raise ValueError("vlcal.tar.scope='response' needs vlcal.vce.scope='full' (KL_t on every token)")
        if r.protocol == "rlcr" and (v.enabled or r.w_vis != 0.0):
            raise ValueError(
                "vlcal.reward.protocol='rlcr' has no visual confidence: disable vce and set w_vis=0"
            )
        if v.vocab_chunk_tokens <= 0:
            raise ValueError(f"vlcal.vce.vocab_chunk_tokens must be > 0, got {v.vocab_chunk_tokens}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> VLCalConfig:
        """Build from a plain dict (e.g. ``OmegaConf.to_container(cfg.vlcal)``), rejecting unknown keys."""
        d = dict(d or {})
        parts = {"reward": RewardConfig, "vce": VCEConfig, "tar": TARConfig}
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key in parts:
                sub = parts[key]
                known = sub.__dataclass_fields__
                unknown = set(value or {}) - set(known)
                if unknown:
                    raise ValueError(f"unknown key(s) in vlcal.{key}: {sorted(unknown)}")
                kwargs[key] = sub(**{k: _cast(sub, key, k, v) for k, v in (value or {}).items()})
            elif key in cls.__dataclass_fields__:
                kwargs[key] = value
            else:
                raise ValueError(f"unknown key in vlcal: {key!r}")
        return cls(**kwargs).validate()
