"""Calibration metrics of a set of (confidence, correct) pairs, and their two standard figures.

Why this module exists: every table of the paper (ACC, AUROC, ECE; docs/design.md §9) is computed from
per-answer confidences Φ ∈ [0, 1] and correctness I ∈ {0, 1}; training logs, ``vlcal metrics``, the
evaluation report and the reward server all use these functions so their numbers agree.

Conventions (each one is a choice a reader should not have to guess):

* ECE uses ``n_bins`` equal-width bins [0, 0.1), [0.1, 0.2), …, [0.9, 1.0] — the last bin is closed.
  Confidences sit on a 0.1 grid (c/10), where ``c * 10`` in floating point can land just below an
  integer (0.3·10 = 2.9999999999999996), so the bin index is ``floor(round(c · n_bins, 9))``, clipped
  to ``n_bins − 1``: 0.3 belongs to [0.3, 0.4), 0.7 to [0.7, 0.8), 1.0 to [0.9, 1.0].
* AUROC (scikit-learn) ranks correct above wrong answers by confidence; it is None (with a reason)
  when only one class is present. Brier = mean (Φ − I)² (scikit-learn).
* Risk–coverage: answers sorted by confidence, highest first; *tied confidences enter together*
  (a curve point only after the whole tie group), so the result never depends on input order.
  AURC = Σ_k (cov_k − cov_{k−1}) · risk_k, the area under that step curve (equal to the usual
  mean over i of the risk of the top-i answers when confidences are distinct).
* Bootstrap intervals (:func:`bootstrap_ci`): items are resampled with replacement, ``n_boot`` draws
  from ``numpy.random.default_rng(seed)`` (:func:`bootstrap_indices`), the percentile interval of each
  metric over the draws. Every draw's five metrics are computed at once from per-draw counts (no Python
  loop over draws); a draw where AUROC is undefined (one class only) is left out of AUROC's interval.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "accuracy",
    "aurc",
    "auroc",
    "auroc_with_reason",
    "bin_indices",
    "bootstrap_ci",
    "bootstrap_difference",
    "bootstrap_indices",
    "bootstrap_metrics",
    "brier_score",
    "calibration_metrics",
    "expected_calibration_error",
    "plot_reliability",
    "plot_risk_coverage",
    "reliability_bins",
    "risk_coverage_curve",
]


def _validate(confidence: Any, correct: Any) -> tuple[np.ndarray, np.ndarray]:
    """Arrays ``confidence`` float64 [n] in [0, 1] and ``correct`` float64 [n] in {0, 1}; clear errors."""
    conf = np.asarray(confidence, dtype=np.float64)
    corr = np.asarray(correct)
    if conf.ndim != 1:
        raise ValueError(f"confidence must be 1-D, got shape {conf.shape}")
    if corr.ndim != 1:
        raise ValueError(f"correct must be 1-D, got shape {corr.shape}")
    if len(conf) != len(corr):
        raise ValueError(f"confidence and correct must have the same length, got {len(conf)} and {len(corr)}")
    if len(conf) == 0:
        raise ValueError("confidence and correct are empty")
    if not np.all(np.isfinite(conf)) or conf.min() < 0.0 or conf.max() > 1.0:
        bad = int(np.flatnonzero(~np.isfinite(conf) | (conf < 0) | (conf > 1))[0])
        raise ValueError(f"confidence must be finite and in [0, 1]; confidence[{bad}] = {conf[bad]!r}")
    try:
        corr = corr.astype(np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"correct must hold booleans or 0/1, got dtype {corr.dtype}") from err
    if not np.all((corr == 0) | (corr == 1)):
        bad = int(np.flatnonzero((corr != 0) & (corr != 1))[0])
        raise ValueError(f"correct must be 0/1 or bool; correct[{bad}] = {corr[bad]!r}")
    return conf, corr


def _check_n_bins(n_bins: int) -> None:
    if not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")


def accuracy(correct: Sequence[Any] | np.ndarray) -> float:
    """Mean of I. ``accuracy([1, 0, 1, 1])`` → 0.75."""
    corr = _validate(np.zeros(len(np.asarray(correct))), correct)[1]
    return float(corr.mean())


def bin_indices(confidence: Sequence[float] | np.ndarray, n_bins: int = 10) -> np.ndarray:
    """Bin of each confidence: ``floor(round(c · n_bins, 9))`` clipped to ``n_bins − 1`` → int [n].

    >>> bin_indices([0.0, 0.3, 0.6, 0.7, 0.99, 1.0]).tolist()
    [0, 3, 6, 7, 9, 9]
    """
    _check_n_bins(n_bins)
    conf = np.asarray(confidence, dtype=np.float64)
    return np.clip(np.floor(np.round(conf * n_bins, 9)).astype(np.int64), 0, n_bins - 1)


def reliability_bins(confidence: Any, correct: Any, n_bins: int = 10) -> list[dict[str, Any]]:
    """Per-bin ``lower``, ``upper``, ``count``, ``accuracy``, ``mean_confidence``, ``gap`` (acc − conf).

    Empty bins have count 0 and None for the averages. Example: with confidence [0.3, 0.35] and correct
    [1, 0], bin 3 = {"lower": 0.3, "upper": 0.4, "count": 2, "accuracy": 0.5, "mean_confidence": 0.325, …}.
    """
    conf, corr = _validate(confidence, correct)
    idx = bin_indices(conf, n_bins)
    count = np.bincount(idx, minlength=n_bins)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    corr_sum = np.bincount(idx, weights=corr, minlength=n_bins)
    bins = []
    for b in range(n_bins):
        n = int(count[b])
        acc = float(corr_sum[b] / n) if n else None
        mean_conf = float(conf_sum[b] / n) if n else None
        bins.append(
            {
                "lower": b / n_bins,
                "upper": (b + 1) / n_bins,
                "count": n,
                "accuracy": acc,
                "mean_confidence": mean_conf,
                "gap": None if n == 0 else acc - mean_conf,
            }
        )
    return bins


def expected_calibration_error(confidence: Any, correct: Any, n_bins: int = 10) -> float:
    """ECE = Σ_b (n_b / N) · |acc_b − conf_b| over equal-width bins (see module docstring for edges).

    >>> expected_calibration_error([0.9, 0.9, 0.3, 0.3], [1, 0, 0, 0])
    0.35
    """
    bins = reliability_bins(confidence, correct, n_bins)
    total = sum(b["count"] for b in bins)
    ece = sum(b["count"] / total * abs(b["gap"]) for b in bins if b["count"])
    return round(float(ece), 12)


def auroc_with_reason(confidence: Any, correct: Any) -> tuple[float | None, str | None]:
    """(AUROC of confidence for separating correct from wrong answers, None) or (None, why undefined)."""
    from sklearn.metrics import roc_auc_score

    conf, corr = _validate(confidence, correct)
    if corr.min() == corr.max():
        which = "correct" if corr[0] == 1 else "wrong"
        return None, f"AUROC undefined: all {len(corr)} answers are {which}"
    return float(roc_auc_score(corr, conf)), None


def auroc(confidence: Any, correct: Any) -> float | None:
    """AUROC (scikit-learn ``roc_auc_score``); None when all answers are correct or all wrong.

    >>> auroc([0.9, 0.8, 0.4, 0.6], [1, 1, 0, 0])
    1.0
    """
    return auroc_with_reason(confidence, correct)[0]


def brier_score(confidence: Any, correct: Any) -> float:
    """Brier = mean (Φ − I)² (scikit-learn ``brier_score_loss``). ``brier_score([1.0, 0.5], [1, 0])`` → 0.125."""
    from sklearn.metrics import brier_score_loss

    conf, corr = _validate(confidence, correct)
    return float(brier_score_loss(corr, conf, pos_label=1, labels=[0, 1]))


def risk_coverage_curve(confidence: Any, correct: Any) -> tuple[np.ndarray, np.ndarray]:
    """Selective-prediction curve: ``(coverage [k], risk [k])``, one point per distinct confidence.

    Point k keeps every answer with confidence ≥ the k-th highest distinct value; risk is the error
    rate among kept answers. Ties enter together, so the curve does not depend on input order.

    >>> cov, risk = risk_coverage_curve([0.9, 0.5, 0.5, 0.1], [1, 1, 0, 0])
    >>> cov.tolist(), risk.tolist()
    ([0.25, 0.75, 1.0], [0.0, 0.3333333333333333, 0.5])
    """
    conf, corr = _validate(confidence, correct)
    order = np.argsort(-conf, kind="stable")
    conf_sorted, wrong_sorted = conf[order], 1.0 - corr[order]
    cum_wrong = np.cumsum(wrong_sorted)
    # last index of each tie group in the descending order
    group_end = np.flatnonzero(np.append(conf_sorted[1:] != conf_sorted[:-1], True))
    kept = group_end + 1
    return kept / len(conf), cum_wrong[group_end] / kept


def aurc(confidence: Any, correct: Any) -> float:
    """Area under the risk–coverage step curve: Σ_k (cov_k − cov_{k−1}) · risk_k (lower is better).

    >>> round(aurc([0.9, 0.5, 0.5, 0.1], [1, 1, 0, 0]), 4)  # 0.25·0 + 0.5·(1/3) + 0.25·0.5
    0.2917
    """
    coverage, risk = risk_coverage_curve(confidence, correct)
    widths = np.diff(np.concatenate([[0.0], coverage]))
    return float(np.sum(widths * risk))


def _mean_or_none(values: np.ndarray) -> float | None:
    return float(values.mean()) if len(values) else None


def calibration_metrics(
    confidence: Any, correct: Any, n_bins: int = 10, parsed: Any | None = None
) -> dict[str, Any]:
    """All summary metrics in one dict (JSON-ready: plain floats, None where undefined).

    Keys: ``n``, ``accuracy``, ``ece``, ``auroc``, ``brier``, ``aurc``, ``mean_conf``,
    ``mean_conf_correct``, ``mean_conf_wrong``, ``n_bins``; ``auroc_note`` when AUROC is undefined;
    ``parse_rate`` when ``parsed`` (bool [n], whether the confidence was parsed) is given.
    """
    conf, corr = _validate(confidence, correct)
    auc, note = auroc_with_reason(conf, corr)
    out: dict[str, Any] = {
        "n": len(conf),
        "accuracy": float(corr.mean()),
        "ece": expected_calibration_error(conf, corr, n_bins),
        "auroc": auc,
        "brier": brier_score(conf, corr),
        "aurc": aurc(conf, corr),
        "mean_conf": float(conf.mean()),
        "mean_conf_correct": _mean_or_none(conf[corr == 1]),
        "mean_conf_wrong": _mean_or_none(conf[corr == 0]),
        "n_bins": int(n_bins),
    }
    if note:
        out["auroc_note"] = note
    if parsed is not None:
        flags = np.asarray(parsed)
        if flags.shape != conf.shape:
            raise ValueError(
                f"parsed must have the same length as confidence, got {flags.shape} vs {conf.shape}"
            )
        out["parse_rate"] = float(flags.astype(bool).mean())
    return out


BOOTSTRAP_METRICS = ("accuracy", "auroc", "ece", "brier", "aurc")


def bootstrap_indices(n: int, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """The resampled item indices, int64 [n_boot, n]: draw b is ``rng.integers(0, n, n)`` of one seeded
    generator, so any two callers with the same (n, n_boot, seed) resample the same items."""
    if n < 1 or n_boot < 1:
        raise ValueError(f"bootstrap needs n >= 1 and n_boot >= 1, got n={n}, n_boot={n_boot}")
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _per_draw_counts(codes: np.ndarray, idx: np.ndarray, n_codes: int, weights: np.ndarray) -> np.ndarray:
    """[n_boot, n_codes]: Σ weights of the resampled items per code, one ``bincount`` for all draws."""
    flat = (codes[idx] + n_codes * np.arange(idx.shape[0])[:, None]).ravel()
    return np.bincount(flat, weights=weights[idx].ravel(), minlength=idx.shape[0] * n_codes).reshape(
        idx.shape[0], n_codes
    )


def bootstrap_metrics(
    confidence: Any, correct: Any, idx: np.ndarray, n_bins: int = 10
) -> dict[str, np.ndarray]:
    """ACC, AUROC, ECE, Brier and AURC of every resample ``idx`` [n_boot, n] → {metric: float64 [n_boot]}.

    Same definitions as the point functions above (ties in AUROC count ½; risk–coverage ties enter
    together); AUROC is NaN in a draw with only one class. Vectorised: each draw is summarised by the
    count of correct / wrong answers per distinct confidence value and the sums per ECE bin.
    """
    conf, corr = _validate(confidence, correct)
    idx = np.asarray(idx, dtype=np.int64)
    if idx.ndim != 2 or idx.size == 0 or idx.min() < 0 or idx.max() >= len(conf):
        raise ValueError(f"idx must be [n_boot, m] indices into {len(conf)} items, got shape {idx.shape}")
    m = idx.shape[1]
    out = {
        "accuracy": corr[idx].mean(1),
        "brier": ((conf - corr) ** 2)[idx].mean(1),
    }
    bins = bin_indices(conf, n_bins)
    gap = _per_draw_counts(bins, idx, n_bins, corr) - _per_draw_counts(bins, idx, n_bins, conf)
    out["ece"] = np.abs(gap).sum(1) / m
    # distinct confidences, highest first: code 0 = the most confident group
    values, inverse = np.unique(-conf, return_inverse=True)
    u = len(values)
    pos = _per_draw_counts(inverse, idx, u, corr)  # correct answers per confidence value
    neg = _per_draw_counts(inverse, idx, u, 1.0 - corr)
    n_pos, n_neg = pos.sum(1), neg.sum(1)
    # AUROC = P(conf_correct > conf_wrong) + ½ P(tie): wrong answers strictly below each value
    neg_below = n_neg[:, None] - np.cumsum(neg, 1)
    pairs = (pos * (neg_below + 0.5 * neg)).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out["auroc"] = np.where((n_pos > 0) & (n_neg > 0), pairs / (n_pos * n_neg), np.nan)
        kept = np.cumsum(pos + neg, 1)
        risk = np.divide(np.cumsum(neg, 1), kept, out=np.zeros_like(kept), where=kept > 0)
    out["aurc"] = ((pos + neg) / m * risk).sum(1)
    return out


def _percentile_interval(values: np.ndarray, level: float) -> list[float] | None:
    finite = values[np.isfinite(values)]
    if not len(finite):
        return None
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(finite, [tail, 100 - tail])
    return [float(low), float(high)]


def bootstrap_ci(
    confidence: Any,
    correct: Any,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    n_bins: int = 10,
    chunk: int = 250,
) -> dict[str, list[float] | None]:
    """Percentile bootstrap intervals {metric: [low, high]} of ACC, AUROC, ECE, Brier, AURC.

    Items are resampled with replacement (:func:`bootstrap_indices`), ``chunk`` draws at a time so memory
    stays ``chunk × n``. None for AUROC when no draw holds both classes.

    >>> ci = bootstrap_ci([0.9, 0.8, 0.3, 0.2], [1, 1, 0, 1], n_boot=2000, seed=0)
    >>> ci["accuracy"][0] <= 0.75 <= ci["accuracy"][1]
    True
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    conf, corr = _validate(confidence, correct)
    idx = bootstrap_indices(len(conf), n_boot, seed)
    parts = [bootstrap_metrics(conf, corr, idx[s : s + chunk], n_bins) for s in range(0, n_boot, chunk)]
    return {k: _percentile_interval(np.concatenate([p[k] for p in parts]), level) for k in BOOTSTRAP_METRICS}


def _point(conf: np.ndarray, corr: np.ndarray, n_bins: int) -> dict[str, float | None]:
    m = calibration_metrics(conf, corr, n_bins)
    return {k: m[k] for k in BOOTSTRAP_METRICS}


def bootstrap_difference(
    a: tuple[Any, Any],
    b: tuple[Any, Any],
    paired: bool,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    n_bins: int = 10,
) -> dict[str, dict[str, Any]]:
    """B − A for each metric: ``{metric: {"a", "b", "diff", "ci95": [low, high] | None}}``.

    ``a``, ``b``: (confidence, correct) of two evaluations. ``paired``: the two arrays hold the same
    items in the same order (joined by uid), and each draw resamples the same items in both, so the
    item-to-item variation common to both cancels; otherwise A and B are resampled independently.
    """
    ca, ya = _validate(*a)
    cb, yb = _validate(*b)
    if paired and len(ca) != len(cb):
        raise ValueError(f"paired bootstrap needs the same items in A and B, got {len(ca)} and {len(cb)}")
    idx_a = bootstrap_indices(len(ca), n_boot, seed)
    idx_b = idx_a if paired else bootstrap_indices(len(cb), n_boot, seed + 1)
    da, db = bootstrap_metrics(ca, ya, idx_a, n_bins), bootstrap_metrics(cb, yb, idx_b, n_bins)
    pa, pb = _point(ca, ya, n_bins), _point(cb, yb, n_bins)
    out = {}
    for k in BOOTSTRAP_METRICS:
        diff = None if pa[k] is None or pb[k] is None else pb[k] - pa[k]
        out[k] = {"a": pa[k], "b": pb[k], "diff": diff, "ci95": _percentile_interval(db[k] - da[k], level)}
    return out


def _figure(width: float = 5.5, height: float = 5.0):
    """A matplotlib Figure on the Agg canvas, without touching the global pyplot backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)
    return fig


def plot_reliability(
    confidence: Any, correct: Any, path: str | Path, title: str | None = None, n_bins: int = 10
) -> Path:
    """Reliability diagram PNG: accuracy per bin (bars) vs the diagonal, gap shaded, counts annotated.

    Returns the written path. The title ends with the ECE.
    """
    bins = reliability_bins(confidence, correct, n_bins)
    ece = expected_calibration_error(confidence, correct, n_bins)
    from matplotlib.patches import Patch

    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    width = 1.0 / n_bins
    for b in bins:
        center = b["lower"] + width / 2
        top = 0.0
        if b["count"]:
            ax.bar(center, b["accuracy"], width=width * 0.95, color="#4C72B0", edgecolor="black", lw=0.5)
            low, high = sorted((b["accuracy"], b["mean_confidence"]))
            ax.bar(center, high - low, bottom=low, width=width * 0.95, color="#C44E52", alpha=0.35, lw=0)
            top = high
        ax.annotate(f"n={b['count']}", (center, top + 0.01), ha="center", va="bottom", fontsize=6.5)
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    handles = [
        Patch(color="#4C72B0", label="accuracy per bin"),
        Patch(color="#C44E52", alpha=0.35, label="gap to mean confidence"),
        ax.lines[-1],
    ]
    ax.lines[-1].set_label("perfect calibration")
    ax.legend(handles=handles, loc="upper left", fontsize=8, framealpha=0.9)
    ax.set(xlim=(0, 1), ylim=(0, 1.08), xlabel="confidence", ylabel="accuracy")
    ax.set_title(f"{title + ' — ' if title else ''}ECE = {ece:.3f} (n = {sum(b['count'] for b in bins)})")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def plot_risk_coverage(
    curves: Mapping[str, tuple[Any, Any]], path: str | Path, title: str | None = None
) -> Path:
    """Risk–coverage curves, one line per ``name -> (confidence, correct)``, AURC in the legend; one PNG."""
    if not curves:
        raise ValueError("curves is empty: give at least one name -> (confidence, correct)")
    fig = _figure(6.0, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    for name, (conf, corr) in curves.items():
        coverage, risk = risk_coverage_curve(conf, corr)
        ax.step(coverage, risk, where="pre", label=f"{name} (AURC {aurc(conf, corr):.3f})")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="coverage", ylabel="risk (error rate)")
    ax.set_title(title or "risk–coverage")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
