"""Per-sample rewards of VL-Calibration, and the batch visual term (docs/design.md §3).

    R = I + w_brier·(−(Φ − I)²) + w_fmt·F + w_vis·(−(c_v − S̃_vis)²)

I (correct), F (format) and the Brier term depend on one sample and are computed while rollouts finish
(:func:`compute_score` for verl, :func:`score_many` for the CLI and the reward server). The visual term
depends on S̃_vis, a z-score over the whole rollout batch, so the trainer adds it after VCE with
:func:`add_visual_term`; ``score`` here never includes it.

Every call returns the same keys, :data:`REWARD_COMPONENT_KEYS` (verl gathers ``reward_extra_info`` by
the first sample's keys). Value types are chosen for verl 0.9.1: ``score``, ``accuracy``, ``format``,
``brier`` are floats; ``confidence``, ``vision_confidence``, ``reasoning_confidence`` are floats in [0, 1]
or **None** when unparsed — verl's ``process_validation_metrics`` drops None before ``np.mean`` (a NaN
would turn the whole mean into NaN), and None is ``null`` in JSON dumps; ``parse_ok`` is a bool
(``np.mean`` gives the parse rate); ``grading_status`` is a str ("ok", "no_answer", "timeout",
"error"), which the validation metrics skip as non-numeric.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any

from vlcal_verl.config import RewardConfig
from vlcal_verl.protocol import parse_response

REWARD_COMPONENT_KEYS: tuple[str, ...] = (
    "score",
    "accuracy",
    "format",
    "brier",
    "confidence",
    "vision_confidence",
    "reasoning_confidence",
    "parse_ok",
    "grading_status",
)
UNPARSED_PENALTY = -1.0
"""Brier term when the confidence is unparsed, and visual term when c_v or S̃_vis is missing."""

# keyword arguments verl's reward loop may pass that are not ours (naive reward manager)
_VERL_EXTRA_KWARGS = frozenset({"reward_router_address", "reward_model_tokenizer"})
_KIND_KEYS = ("answer_kind", "kind")


def brier_term(confidence: float | None, correct: bool | float) -> float:
    """−(c − I)², or −1 when the confidence is unparsed (None).

    >>> brier_term(0.8, True)  # −(0.8 − 1)² = −0.04
    -0.03999999999999998
    >>> brier_term(None, True)
    -1.0
    """
    if confidence is None or not math.isfinite(confidence):
        return UNPARSED_PENALTY
    return -((confidence - float(correct)) ** 2)


def visual_reward(c_v: float | None, s_vis: float | None) -> float:
    """−(c_v − S̃_vis)², or −1 when c_v or S̃_vis is missing (None or NaN).

    >>> visual_reward(0.75, 0.25)  # −(0.5)²
    -0.25
    >>> visual_reward(0.7, float("nan"))
    -1.0
    """
    if c_v is None or s_vis is None or not (math.isfinite(c_v) and math.isfinite(s_vis)):
        return UNPARSED_PENALTY
    return -((c_v - s_vis) ** 2)


def add_visual_term(scores, c_v: Sequence[float | None], s_vis, w_vis: float):
    """R ← R + w_vis·(−(c_v − S̃_vis)²) per sample.

    Args:
        scores: Tensor [B], per-sample rewards without the visual term.
        c_v: B visual confidences in [0, 1], None when unparsed.
        s_vis: Tensor [B], S̃_vis in [0, 1], NaN where the sample has no vision span.
        w_vis: weight of the visual term (0 returns ``scores`` unchanged in value).

    Returns:
        Tensor [B] (new tensor, same dtype and device as ``scores``).
    """
    import torch

    if scores.dim() != 1 or len(c_v) != scores.shape[0] or s_vis.shape != scores.shape:
        raise ValueError(
            f"add_visual_term: scores {tuple(scores.shape)}, c_v ({len(c_v)}) and s_vis "
            f"{tuple(s_vis.shape)} must all have batch size B"
        )
    s_list = s_vis.detach().cpu().double().tolist()
    terms = [visual_reward(c, s) for c, s in zip(c_v, s_list, strict=False)]
    return scores + w_vis * torch.tensor(terms, dtype=scores.dtype, device=scores.device)


def _grade_status(grade: Any) -> tuple[float, str]:
    return (1.0 if grade.correct else 0.0), str(grade.status)


def score_response(
    response: str,
    ground_truth: str,
    data_source: str | None = None,
    *,
    config: RewardConfig | None = None,
    grade: Any | None = None,
    kind: str | None = None,
) -> dict[str, Any]:
    """Score one response: ``score`` = I + w_brier·Brier + w_fmt·F, plus the component keys.

    ``grade`` (a ``grading.GradeResult``) is used when given — the caller graded in a pool; otherwise the
    boxed answer is graded here with ``grading.grade_with_timeout`` (a timeout counts as incorrect,
    ``grading_status`` "timeout"). ``kind``: "math", "multiple_choice", "yes_no" or None (auto).
    ``data_source`` is accepted for verl's signature; the rules do not depend on it.

    >>> from vlcal_verl.grading import GradeResult
    >>> r = score_response("<think><vision>a</vision><reasoning>b</reasoning></think>\\\\boxed{4}"
    ...     "<analysis>c</analysis><confidence><vision_confidence>10</vision_confidence>"
    ...     "<reasoning_confidence>10</reasoning_confidence></confidence>", "4",
    ...     grade=GradeResult(True, "ok", "exact", None))
    >>> r["score"], r["accuracy"], r["format"], r["brier"]  # 1 + 2·0 + 0.4·1
    (1.4, 1.0, 1.0, -0.0)
    """
    cfg = config or RewardConfig()
    ground_truth = str(ground_truth)
    if cfg.reference_parity:
        return _score_reference(response, ground_truth, cfg, grade)
    parsed = parse_response(response if isinstance(response, str) else "", cfg.protocol)
    if grade is None:
        grade = _grade(parsed.answer, ground_truth, kind, cfg.grading_timeout_s)
    accuracy, status = _grade_status(grade)
    fmt = 1.0 if parsed.format_ok else 0.0
    brier = brier_term(parsed.confidence, accuracy)
    return {
        "score": accuracy + cfg.w_brier * brier + cfg.w_fmt * fmt,
        "accuracy": accuracy,
        "format": fmt,
        "brier": brier,
        "confidence": parsed.confidence,
        "vision_confidence": parsed.vision_confidence,
        "reasoning_confidence": parsed.reasoning_confidence,
        "parse_ok": parsed.parse_ok,
        "grading_status": status,
    }


def _score_reference(response: str, ground_truth: str, cfg: RewardConfig, grade: Any | None) -> dict:
    """The authors' decouple or RLCR reward (see :mod:`vlcal_verl.rewards_reference`).

    Without a ``grade``, I is the authors' mathruler check run in the grading pool with
    ``grading_timeout_s`` (same verdicts as theirs; a hung sympy call becomes status "timeout")."""
    from vlcal_verl.grading import reference_grade_with_timeout
    from vlcal_verl.rewards_reference import reference_components, reference_rlcr_components

    text = response if isinstance(response, str) else ""
    if grade is None:
        grade = reference_grade_with_timeout(text, ground_truth, cfg.grading_timeout_s)
    accuracy = float(grade.correct)
    components = reference_rlcr_components if cfg.protocol == "rlcr" else reference_components
    parts = components(text, ground_truth, accuracy)
    score = parts["accuracy"] + cfg.w_brier * parts["brier"] + cfg.w_fmt * parts["format"]
    return {"score": score, **parts, "grading_status": str(grade.status)}


def _grade(answer: str | None, ground_truth: str, kind: str | None, timeout_s: float):
    from vlcal_verl.grading import grade_answer, grade_with_timeout

    if answer is None:  # no boxed answer: "no_answer", decided in-process without the pool
        return grade_answer(None, ground_truth, kind=kind)
    return grade_with_timeout(answer, ground_truth, kind=kind, timeout_s=timeout_s)


def config_from_kwargs(kwargs: dict[str, Any]) -> RewardConfig:
    """RewardConfig from verl's ``custom_reward_function.reward_kwargs``; unknown keys are an error."""
    fields = {f.name for f in dataclasses.fields(RewardConfig)}
    unknown = set(kwargs) - fields - _VERL_EXTRA_KWARGS
    if unknown:
        raise ValueError(
            f"unknown reward_kwargs {sorted(unknown)}; custom_reward_function.reward_kwargs accepts "
            f"{sorted(fields)}"
        )
    return RewardConfig(**{k: v for k, v in kwargs.items() if k in fields})


def answer_kind(extra_info: dict | None) -> str | None:
    """The grading kind of a sample from ``extra_info['answer_kind']`` (or ``['kind']``).

    Only the kinds the grader knows ("math", "multiple_choice", "yes_no") are returned; anything else
    (missing, None, "free_form", …) means auto-detection from the ground truth (None).

    >>> answer_kind({"answer_kind": "multiple_choice"}), answer_kind({"kind": "caption"}), answer_kind(None)
    ('multiple_choice', None, None)
    """
    from vlcal_verl.grading import KINDS

    if not isinstance(extra_info, dict):
        return None
    for key in _KIND_KEYS:
        value = extra_info.get(key)
        if value in KINDS:
            return value
    return None


def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: str,
    extra_info: dict | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """verl 0.9.1 ``custom_reward_function`` entry point → {"score": …, <REWARD_COMPONENT_KEYS>}.

    Weights and protocol come from ``reward_kwargs`` (fields of :class:`RewardConfig`; any other key
    is an error, so a typo fails the first step instead of silently using a default), e.g.::

        reward:
          custom_reward_function:
            path: pkg://vlcal_verl.rewards   # or the file path of this module
            name: compute_score
            reward_kwargs: {w_brier: 2.0, w_fmt: 0.4, protocol: decoupled}

    The grading kind comes from ``extra_info["answer_kind"]`` (or ``extra_info["kind"]``), else auto.

    >>> out = compute_score("toy", "no protocol, no answer", "4")
    >>> out["score"], out["brier"], out["confidence"], out["parse_ok"], out["grading_status"]
    (-2.0, -1.0, None, False, 'no_answer')
    """
    cfg = config_from_kwargs(kwargs)
    return score_response(solution_str, ground_truth, data_source, config=cfg, kind=answer_kind(extra_info))


def score_many(
    items: Iterable[tuple[str, str, str | None]],
    config: RewardConfig | None = None,
    grader: Any | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Score (response, ground_truth, kind) triples, grading all answers in parallel.

    ``grader``: an open ``grading.Grader`` to reuse; by default one is opened for this call. In
    reference-parity mode the pool runs the authors' mathruler check instead of ours.
    """
    cfg = config or RewardConfig()
    items = list(items)
    if cfg.reference_parity:
        return _score_many_reference(items, cfg, grader, progress)
    answers = [parse_response(r if isinstance(r, str) else "", cfg.protocol).answer for r, _, _ in items]
    jobs = [(a, str(gt), kind) for a, (_, gt, kind) in zip(answers, items, strict=False)]
    if grader is None:
        from vlcal_verl.grading import Grader

        with Grader(timeout_s=cfg.grading_timeout_s) as pool:
            grades = _grade_all(pool, jobs, progress)
    else:
        grades = _grade_all(grader, jobs, progress)
    return [score_response(r, gt, config=cfg, grade=g) for (r, gt, _), g in zip(items, grades, strict=False)]


def _score_many_reference(items: list, cfg: RewardConfig, grader: Any | None, progress: bool) -> list:
    from vlcal_verl.grading import Grader, reference_grade

    def run(pool: Any) -> list:
        texts = [r if isinstance(r, str) else "" for r, _, _ in items]
        futures = [
            pool._schedule(reference_grade, (t, str(gt))) for t, (_, gt, _) in zip(texts, items, strict=True)
        ]
        pairs = _bar(list(zip(futures, items, strict=True)), progress, "grading")
        return [score_response(r, gt, config=cfg, grade=f.result()) for f, (r, gt, _) in pairs]

    if grader is not None:
        return run(grader)
    with Grader(timeout_s=cfg.grading_timeout_s) as pool:
        return run(pool)


def _grade_all(grader: Any, jobs: list[tuple[str | None, str, str | None]], progress: bool) -> list:
    from vlcal_verl.grading import grade_answer

    # nothing to grade (no boxed answer) is decided in-process, without a round trip to the pool
    futures = [grader.submit(a, gt, kind=k) if a is not None else None for a, gt, k in jobs]
    return [
        f.result() if f is not None else grade_answer(None, gt, kind=k)
        for f, (_, gt, k) in _bar(list(zip(futures, jobs, strict=True)), progress, "grading")
    ]


def _bar(seq: list, progress: bool, desc: str):
    if not progress:
        return seq
    from tqdm import tqdm

    return tqdm(seq, desc=desc, unit="resp")
