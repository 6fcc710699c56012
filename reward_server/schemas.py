"""Request and response bodies of the reward server (pydantic v2).

The schemas are the server's contract with clients in any language: field names follow verl's reward
function arguments (``data_source``, ``response`` = verl's ``solution_str``, ``ground_truth``,
``extra_info``) and the component keys are those of ``vlcal score``. Wrong types and missing fields
become 422 responses whose ``loc`` names the field (e.g. ``["body", "items", 3, "response"]``).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from vlcal_verl.config import check_value

ItemStatus = Literal["ok", "timeout", "parse_error", "error"]


def _str_or_number(value: Any) -> Any:
    """Accept numbers where a string is expected (uids and ground truths are often ints in parquet)."""
    if isinstance(value, bool):
        return value  # let pydantic reject booleans as strings
    if isinstance(value, int | float):
        return str(value)
    return value


Text = Annotated[str, BeforeValidator(_str_or_number)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ScoreItem(_Strict):
    """One response to score."""

    uid: Text
    """Caller's id, echoed back (verl: sample index or rollout uid)."""
    data_source: str = ""
    """verl's data_source (benchmark / dataset name)."""
    response: str
    """The decoded model response (verl's ``solution_str``)."""
    ground_truth: Text
    """Reference answer; may be wrapped in ``\\boxed{}``."""
    extra_info: dict[str, Any] | None = None
    """verl's extra_info (JSON-safe); passed to the reward unchanged."""


class RewardSpec(_Strict):
    """Which reward the caller expects; a mismatch is a 422, never a silently different reward."""

    name: str = "vl-calibration"
    version: str | None = None


class Weights(_Strict):
    """Per-request overrides of R = I + w_brier·(−(Φ − I)²) + w_fmt·F (+ w_vis·visual term), of the
    protocol, and of ``reference_parity`` (the authors' decouple reward instead of ours)."""

    w_brier: float | None = None
    w_fmt: float | None = None
    w_vis: float | None = None
    protocol: Literal["decoupled", "rlcr"] | None = None
    reference_parity: bool | None = None

    @model_validator(mode="after")
    def _finite(self) -> Weights:
        for name in ("w_brier", "w_fmt", "w_vis"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value}")
            check_value(f"reward.{name}", value, f"weights.{name}")  # training's ranges: a 422 naming them
        return self


class ScoreRequest(_Strict):
    items: list[ScoreItem]
    reward: RewardSpec | None = None
    weights: Weights | None = None


class Components(BaseModel):
    """The fixed component keys of ``vlcal score`` (same keys for every item)."""

    accuracy: float | None = None
    format: float | None = None
    brier: float | None = None
    confidence: float | None = None
    vision_confidence: float | None = None
    reasoning_confidence: float | None = None
    parse_ok: bool | float | None = None
    grading_status: str | None = None


class ScoreResult(BaseModel):
    uid: str
    score: float | None
    """R for this item; None only when status is 'error' (the reward could not be computed)."""
    status: ItemStatus
    components: dict[str, Any]
    latency_ms: float
    error: str | None = None


class RewardInfo(BaseModel):
    name: str
    version: str
    weights: dict[str, Any]


class ScoreResponse(BaseModel):
    results: list[ScoreResult]
    reward: RewardInfo
    n_items: int
    latency_ms: float


# ---- /v1/visual-labels ---------------------------------------------------------------------------


class VisualSample(_Strict):
    """Per-sample VCE statistics: either K̄ and H̄, or per-token KL_t and H_t (with an optional span).

    ``span`` is a half-open ``[start, end)`` token range of the vision span inside ``kl``/``entropy``;
    without it the whole array is the span. A sample with no vision span (``kl_mean``/``kl`` absent or
    an empty span) gets no S̃ (``s_tilde: null``).
    """

    uid: Text
    kl_mean: float | None = Field(default=None, ge=0.0)
    entropy_mean: float | None = Field(default=None, ge=0.0)
    kl: list[float] | None = None
    entropy: list[float] | None = None
    span: tuple[int, int] | None = None
    vision_confidence: float | None = Field(default=None, ge=0.0, le=1.0)
    """Optional c_v in [0, 1]; when given the reply includes −(c_v − S̃)²."""

    @model_validator(mode="after")
    def _one_form(self) -> VisualSample:
        means = (self.kl_mean is None, self.entropy_mean is None)
        tokens = (self.kl is None, self.entropy is None)
        if means[0] != means[1]:
            raise ValueError("kl_mean and entropy_mean must be given together")
        if tokens[0] != tokens[1]:
            raise ValueError("kl and entropy must be given together")
        if not means[0] and not tokens[0]:
            raise ValueError("give either kl_mean/entropy_mean or kl/entropy arrays, not both")
        if not tokens[0]:
            if len(self.kl) != len(self.entropy):  # type: ignore[arg-type]
                raise ValueError(f"kl has {len(self.kl)} tokens but entropy has {len(self.entropy)}")  # type: ignore[arg-type]
            bad = [v for v in (*self.kl, *self.entropy) if not math.isfinite(v) or v < 0]  # type: ignore[misc]
            if bad:
                raise ValueError(f"kl and entropy must be finite and >= 0, got {bad[0]}")
            if self.span is not None:
                start, end = self.span
                if not 0 <= start <= end <= len(self.kl):  # type: ignore[arg-type]
                    raise ValueError(f"span {list(self.span)} is outside [0, {len(self.kl)}]")  # type: ignore[arg-type]
        return self


class VisualLabelRequest(_Strict):
    samples: list[VisualSample]
    signal: Literal["both", "kl", "entropy"] = "both"
    eps: float = Field(default=1e-8, gt=0.0)


class VisualLabel(BaseModel):
    uid: str
    kl_mean: float | None
    entropy_mean: float | None
    s: float | None
    """S = log(K̄ + ε) − log(H̄ + ε) (or one term, per ``signal``); None without a span."""
    s_tilde: float | None
    """S̃_vis = sigmoid of the batch z-score of S; None without a span."""
    visual_reward: float | None = None


class VisualLabelResponse(BaseModel):
    labels: list[VisualLabel]
    n_with_span: int


# ---- /get_reward (OpenRLHF remote reward model) ------------------------------------------------


class OpenRLHFRequest(BaseModel):
    """OpenRLHF's remote-RM body: ``query`` = prompt + response, ``prompts``, ``labels`` (ground truths).

    Extra keys (e.g. OpenRLHF's ``metas``) are accepted and ignored.
    """

    model_config = ConfigDict(extra="ignore")

    query: list[str]
    prompts: list[str] | None = None
    labels: list[Text]

    @model_validator(mode="after")
    def _aligned(self) -> OpenRLHFRequest:
        for name in ("prompts", "labels"):
            value = getattr(self, name)
            if value is not None and len(value) != len(self.query):
                raise ValueError(f"{name} has {len(value)} entries but query has {len(self.query)}")
        return self


class OpenRLHFResponse(BaseModel):
    rewards: list[float]
    """R per query (used for advantages)."""
    scores: list[float]
    """Answer correctness I in {0, 1} per query (OpenRLHF's dynamic filtering)."""
    extra_logs: dict[str, list[Any]]
    split: list[str] = []
    """Per query, how the response was found in it: prefix | prompt_suffix | assistant_marker |
    no_prompt | not_found (scored as an empty response; see :mod:`reward_server.openrlhf`)."""
