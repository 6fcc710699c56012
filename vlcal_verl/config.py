"""Typed configuration for the ``vlcal:`` block.

The verl trainer, evaluation and the reward server read these dataclasses; the Hydra YAML of a run is
checked against them (unknown keys, wrong types and invalid combinations name the field). The dataclass
defaults are this project's exact computation with the authors' weights; a training run composes the
``variant`` config group on top — ``authors`` (their released run) by default, ``exact`` equal to these
defaults (docs/design.md §10).
"""

from __future__ import annotations

import math
import typing
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

ProtocolName = Literal["decoupled", "rlcr"]
KLEstimator = Literal["exact", "k3", "reference"]
VCEScope = Literal["truncated", "full"]
VCESignal = Literal["both", "kl", "entropy"]
TARScope = Literal["vision_span", "response"]
TokenEntropy = Literal["distribution", "nll"]
TARKL = Literal["vce", "k3_clamped"]


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
    """Score exactly as the authors' released reward functions do: their decouple reward for
    ``protocol='decoupled'``, their RLCR reward (confidence (c/10)^1.3, missing → 0.5, whole-layout format)
    for ``protocol='rlcr'``."""
    grading_timeout_s: float = 5.0
    """Per-answer grading timeout; a timeout is graded incorrect with status 'timeout'."""

    def validate(self, labels: dict[str, str] | None = None) -> RewardConfig:
        """Types and :data:`RANGES` (``labels``: field → the name the user typed, e.g. ``--w-brier``)."""
        check_section(self, labels)
        return self


@dataclass
class VCEConfig:
    """Visual Certainty Estimation: masked-image forward, KL_t and H_t on the vision span."""

    enabled: bool = True
    """Run VCE and add the visual reward term."""
    mask_prob: float = 0.8
    """Probability p that a cell is blacked out."""
    mask_cell_px: int = 0
    """Cell size: 0 = the model's merged-patch grid (one cell = one LLM image token: 32 px on Qwen3-VL);
    N > 0 = N-pixel squares of the resized image (the authors used 14, Qwen2.5-VL's patch size)."""
    seed: int = 0
    """Base seed; masks are seeded by (seed, uid, image index)."""
    estimator: KLEstimator = "exact"
    """'exact' full-vocab KL(p_orig‖p_masked), 'k3' e^d−d−1, or the authors' 'reference'
    p(y)·clamp(log p − log p_masked, ±20) in [0, 10]. 'k3' and 'reference' read the sampled token only."""
    entropy: TokenEntropy = "distribution"
    """H_t in S = log K̄ − log H̄: the entropy of p_orig ('distribution', the paper's text) or the sampled
    token's NLL −log p_orig(y_t) ('nll', the authors' code)."""
    scope: VCEScope = "truncated"
    """'truncated' stops the masked forward at the vision span's end; 'full' runs the whole response."""
    signal: VCESignal = "both"
    """S = log K̄ − log H̄ ('both'), log K̄ only ('kl'), or −log H̄ only ('entropy') — the paper's ablations."""
    fused: bool = True
    """Run VCE inside verl's old-log-prob pass (its original forward is VCE's; one masked forward per
    micro-batch). False: a separate ``compute_vce`` call after it (original + masked forward)."""
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
    kl: TARKL = "vce"
    """KL_t of s_t: VCE's KL_t ('vce') or the authors' clamp(e^d − d − 1, 0, 10) with
    d = clamp(log p_masked(y_t) − log p_old(y_t), ±20) ('k3_clamped')."""
    entropy: TokenEntropy = "distribution"
    """H_t of s_t: entropy of p_old ('distribution') or −log p_old(y_t) ('nll', the authors')."""
    eps: float = 1e-8
    """ε in s_t = log(KL_t + ε) − log(H_t + ε)."""


@dataclass
class PerceptionConfig:
    """The authors' perception-token loss filter: per response, only the ⌈top_fraction·n⌉ tokens with
    the largest clamped k3 KL between the original and the masked image get the policy-gradient loss
    (the KL-to-reference loss still covers every token). Needs ``vce.scope='full'``."""

    enabled: bool = False
    """Apply the filter (the authors' released run: on)."""
    top_fraction: float = 0.2
    """Fraction of each response's tokens kept for the policy-gradient loss (rounded up)."""


def _cast(cls: type, section: str, name: str, value: Any) -> Any:
    """YAML 1.1 reads ``1e-3`` as a string: cast strings for float/int fields, naming the field on error."""
    default = cls.__dataclass_fields__[name].default
    if isinstance(value, str) and isinstance(default, int | float) and not isinstance(default, bool):
        if value.strip().lower().lstrip("+-") in (".nan", ".inf", "nan", "inf", "infinity"):
            raise ValueError(f"vlcal.{section}.{name} must be a finite number, got {value!r}")
        try:
            return type(default)(float(value)) if isinstance(default, float) else int(value)
        except ValueError:
            raise ValueError(f"vlcal.{section}.{name} must be a number, got {value!r}") from None
    return value


_SECTION_NAMES = {
    "RewardConfig": "reward",
    "VCEConfig": "vce",
    "TARConfig": "tar",
    "PerceptionConfig": "perception",
}


@dataclass(frozen=True)
class Range:
    """The values a number may take; ``why`` says what goes wrong outside (shown in the error)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    why: str = ""

    def __contains__(self, value: float) -> bool:
        lo, hi = self.low, self.high
        above = lo is None or (value > lo if self.low_open else value >= lo)
        below = hi is None or (value < hi if self.high_open else value <= hi)
        return above and below

    def __str__(self) -> str:
        lo, hi = self.low, self.high
        if lo is not None and hi is not None:
            return f"in {'(' if self.low_open else '['}{lo:g}, {hi:g}{')' if self.high_open else ']'}"
        if lo is not None:
            return f"{'>' if self.low_open else '>='} {lo:g}"
        return f"{'<' if self.high_open else '<='} {hi:g}"


RANGES: dict[str, Range] = {
    "reward.w_brier": Range(0.0, why="a negative weight rewards miscalibration; 0 turns the Brier term off"),
    "reward.w_fmt": Range(0.0, why="a negative weight rewards a broken output format"),
    "reward.w_vis": Range(0.0, why="a negative weight rewards visual miscalibration; 0 turns the term off"),
    "reward.grading_timeout_s": Range(
        0.0, low_open=True, why="with no time every answer grades as a timeout"
    ),
    "vce.mask_prob": Range(
        0.0, 1.0, low_open=True, why="a probability; p = 0 masks nothing, so VCE measures nothing"
    ),
    "vce.mask_cell_px": Range(0.0, why="0 = the model's merged-patch grid, N = N-pixel squares"),
    "vce.vocab_chunk_tokens": Range(1.0, why="tokens per chunk of the exact KL"),
    "vce.eps": Range(0.0, low_open=True, why="log(0) when a mean signal is 0"),
    "tar.w_min": Range(0.0, why="a negative weight flips the sign of the advantage"),
    "tar.w_max": Range(0.0, why="a negative weight flips the sign of the advantage; and >= w_min"),
    "tar.eps": Range(0.0, low_open=True, why="log(0) when a signal is 0"),
    "perception.top_fraction": Range(0.0, 1.0, low_open=True, why="the fraction of tokens kept for the loss"),
}
"""Valid range of every bounded number in the ``vlcal:`` block (README: Training on a GPU cluster)."""


def check_value(key: str, value: Any, label: str | None = None) -> None:
    """Raise ValueError ``LABEL=VALUE is out of range: must be RANGE (why)`` when ``value`` is outside
    ``RANGES[key]`` (``key`` as ``"reward.w_brier"``; ``label`` defaults to ``vlcal.<key>``). The one check
    behind ``--check``, start-up, ``vlcal score``'s weight flags and the reward server's weights."""
    bounds = RANGES.get(key)
    if bounds is None or isinstance(value, bool) or not isinstance(value, int | float):
        return
    if not math.isfinite(value) or value not in bounds:
        why = f" ({bounds.why})" if bounds.why else ""
        raise ValueError(f"{label or 'vlcal.' + key}={value!r} is out of range: must be {bounds}{why}")


def check_section(section: Any, labels: dict[str, str] | None = None) -> None:
    """Every field has its declared type (Literal choices, finite numbers, real booleans) and lies in its
    :data:`RANGES` entry; ``labels`` renames fields in the message (e.g. a CLI flag).

    Dataclasses do not check types, and OmegaConf passes a ``Literal`` or a ``.nan`` through, so
    ``tar.scope: vision-span`` or ``w_brier: .nan`` would otherwise run with a silently wrong meaning.
    """
    name = _SECTION_NAMES.get(type(section).__name__, type(section).__name__)
    hints = typing.get_type_hints(type(section))
    for f in fields(section):
        value, hint = getattr(section, f.name), hints[f.name]
        where = (labels or {}).get(f.name, f"vlcal.{name}.{f.name}")
        if typing.get_origin(hint) is Literal:
            choices = typing.get_args(hint)
            if value not in choices:
                raise ValueError(f"{where} must be one of {list(choices)}, got {value!r}")
        elif hint is bool:
            if not isinstance(value, bool):
                raise ValueError(f"{where} must be true or false, got {value!r}")
        elif hint in (int, float):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{where} must be a number, got {value!r}")
            if hint is int and not float(value).is_integer():
                raise ValueError(f"{where} must be an integer, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{where} must be a finite number, got {value!r}")
            check_value(f"{name}.{f.name}", value, where)


@dataclass
class VLCalConfig:
    """The ``vlcal:`` block shared by the verl trainer, the local engine and the reward server."""

    reward: RewardConfig = field(default_factory=RewardConfig)
    vce: VCEConfig = field(default_factory=VCEConfig)
    tar: TARConfig = field(default_factory=TARConfig)
    perception: PerceptionConfig = field(default_factory=PerceptionConfig)
    variant: str = "exact"
    """Name of the preset the ``variant`` config group applied ('authors' or 'exact'); names runs."""
    ablation: str = "full"
    """Name of the paper row the ``ablation`` config group applied; names runs."""
    reward_server_url: str | None = None
    """When set, per-sample rewards come from this reward server instead of in-process scoring."""
    node_watchdog_s: float = 10.0
    """Seconds between the driver's checks that every node running the job's actors is alive; a lost node
    ends the job (exit 3) instead of hanging it (vlcal_verl.verl_ext.node_watchdog). 0 turns it off."""

    def validate(self) -> VLCalConfig:
        """Raise ValueError naming the field when a combination is invalid; return self."""
        r, v, t, pc = self.reward, self.vce, self.tar, self.perception
        for section in (r, v, t, pc):
            check_section(section)
        dog = self.node_watchdog_s
        if isinstance(dog, bool) or not isinstance(dog, int | float) or not math.isfinite(dog) or dog < 0:
            raise ValueError(f"vlcal.node_watchdog_s must be a number of seconds >= 0 (0: off), got {dog!r}")
        if t.w_min > t.w_max:
            raise ValueError(
                f"vlcal.tar.w_min={t.w_min!r} is out of range: must be <= vlcal.tar.w_max={t.w_max!r} "
                "(the most visually certain tokens get the smaller weight)"
            )
        if t.enabled and not v.enabled:
            raise ValueError("vlcal.tar.enabled needs vlcal.vce.enabled (TAR uses KL_t and H_t)")
        if t.enabled and t.scope == "response" and v.scope != "full":
            raise ValueError("vlcal.tar.scope='response' needs vlcal.vce.scope='full' (KL_t on every token)")
        if r.protocol == "rlcr" and (v.enabled or r.w_vis != 0.0):
            raise ValueError(
                "vlcal.reward.protocol='rlcr' has no visual confidence: disable vce and set w_vis=0"
            )
        if pc.enabled and not v.enabled:
            raise ValueError(
                "vlcal.perception.enabled needs vlcal.vce.enabled (it ranks tokens by the masked KL)"
            )
        if pc.enabled and v.scope != "full":
            raise ValueError(
                "vlcal.perception.enabled needs vlcal.vce.scope='full' (masked log-probs of every response token)"
            )
        if t.enabled and t.kl == "k3_clamped" and t.scope == "response" and v.scope != "full":
            raise ValueError("vlcal.tar.kl='k3_clamped' over the response needs vlcal.vce.scope='full'")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> VLCalConfig:
        """Build from a plain dict (e.g. ``OmegaConf.to_container(cfg.vlcal)``), rejecting unknown keys."""
        d = dict(d or {})
        parts = {"reward": RewardConfig, "vce": VCEConfig, "tar": TARConfig, "perception": PerceptionConfig}
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
