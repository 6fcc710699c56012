"""Visual columns of the evaluation report: agreement with the exact easy-vqa judge, the no-image gap.

``visual_block``: how well c_v and S̃_vis rank the items z_vis saw right (``visual_correct`` = 1, from
:mod:`vlcal_verl.evaluation.visual_judge`) above those it saw wrong (0), as AUROC with a bootstrap
ci95, plus the judge's counts. ``no_image_gap``: how much Φ and c_v drop when the image is removed
(mean over answerable − mean over unanswerable records), with a bootstrap ci95. Both follow the
report's convention: an unparsed confidence counts as 0. Intervals reuse :mod:`vlcal_verl.metrics`'s
resampling (``bootstrap_ci``, ``bootstrap_indices``).
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from vlcal_verl.data.schema import UNANSWERABLE_UID_SUFFIX as UNANSWERABLE_SUFFIX
from vlcal_verl.evaluation.visual_judge import STATUSES
from vlcal_verl.metrics import auroc_with_reason, bootstrap_ci, bootstrap_indices

JUDGE_STATUSES = tuple(st for st in STATUSES if st not in ("correct", "blank_image"))
"""Statuses counted per block (``n_wrong``, ``n_incomplete``, ``n_undescribed``, ``n_no_vision``)."""


def _auroc_ci(score: Sequence[float], label: Sequence[int], n_boot: int, seed: int) -> dict[str, Any]:
    """{n, auroc, ci95[, auroc_note]}: AUROC of ``score`` (in [0, 1]) for label 1 over 0, with the
    percentile bootstrap interval of :func:`vlcal_verl.metrics.bootstrap_ci` (None without both classes)."""
    if not score:
        return {"n": 0, "auroc": None, "ci95": None, "auroc_note": "no items"}
    auc, note = auroc_with_reason(score, label)
    ci = bootstrap_ci(score, label, n_boot=n_boot, seed=seed)["auroc"] if n_boot and auc is not None else None
    return {"n": len(score), "auroc": auc, "ci95": ci, **({"auroc_note": note} if note else {})}


def visual_block(records: Sequence[Mapping[str, Any]], n_boot: int = 1000, seed: int = 0) -> dict | None:
    """Agreement of c_v and of S̃_vis with the exact visual judge's ``visual_correct`` (answerable
    records that carry the field; None when none does).

    Counts: ``n_items`` (records with the field), ``n_judged`` (1 or 0), ``n_correct``, and per
    ``visual_judgment`` status (``n_undescribed``: a vision span naming no colour or shape;
    ``n_no_vision``: no vision span). ``c_v``: AUROC of c_v (unparsed = 0, the report's convention) for
    visual_correct over the judged items; ``s_vis``: the same for S̃_vis over the judged items that have
    one (rank-transformed into [0, 1] for the bootstrap; AUROC depends on ranks only).
    """
    from scipy.stats import rankdata

    items = [r for r in records if "visual_correct" in r]
    if not items:
        return None
    judged = [r for r in items if r["visual_correct"] is not None]
    label = [int(r["visual_correct"]) for r in judged]
    out: dict[str, Any] = {
        "n_items": len(items),
        "n_judged": len(judged),
        "n_correct": sum(label),
        **{f"n_{st}": sum(r.get("visual_judgment") == st for r in items) for st in JUDGE_STATUSES},
    }
    cv = [0.0 if r.get("vision_confidence") is None else float(r["vision_confidence"]) for r in judged]
    out["c_v"] = _auroc_ci(cv, label, n_boot, seed)
    with_s = [(float(r["s_vis"]), y) for r, y in zip(judged, label, strict=True) if _finite(r.get("s_vis"))]
    ranks = (rankdata([s for s, _ in with_s]) / len(with_s)).tolist() if with_s else []
    out["s_vis"] = _auroc_ci(ranks, [y for _, y in with_s], n_boot, seed)
    return out


def _finite(v: Any) -> bool:
    return isinstance(v, numbers.Real) and bool(np.isfinite(float(v)))


def _twin_order(answerable: Sequence[Mapping[str, Any]], blank: Sequence[Mapping[str, Any]]) -> list | None:
    """The blank records in the answerable ones' order when they are exactly the uid twins (``uid`` +
    ``#unanswerable``, one each); None otherwise."""
    base = [str(r.get("uid")).removesuffix(UNANSWERABLE_SUFFIX) for r in blank]
    uids = [r.get("uid") for r in answerable]
    if None in uids or len(set(uids)) != len(uids) or len(set(base)) != len(base) or set(base) != set(uids):
        return None
    pos = {u: i for i, u in enumerate(base)}
    return [blank[pos[u]] for u in uids]


def no_image_gap(
    answerable: Sequence[Mapping[str, Any]],
    blank: Sequence[Mapping[str, Any]],
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any] | None:
    """Mean answerable − mean unanswerable (image removed) of Φ (``confidence``) and of c_v
    (``vision_confidence``), unparsed = 0, each with a percentile bootstrap ci95 over
    :func:`vlcal_verl.metrics.bootstrap_indices` draws: ``paired`` when the blank records are exactly the
    answerable ones' uid twins (each draw resamples pairs), else the two sides are drawn independently."""
    if not answerable or not blank:
        return None
    twins = _twin_order(answerable, blank)
    b_side = twins if twins is not None else blank
    idx_a = idx_b = None
    if n_boot:
        idx_a = bootstrap_indices(len(answerable), n_boot, seed)
        idx_b = idx_a if twins is not None else bootstrap_indices(len(blank), n_boot, seed + 1)
    out: dict[str, Any] = {
        "paired": twins is not None,
        "n_answerable": len(answerable),
        "n_blank": len(blank),
    }
    for key in ("confidence", "vision_confidence"):
        if all(r.get(key) is None for r in (*answerable, *blank)):  # e.g. c_v under the RLCR protocol
            out[key] = {"gap": None, "ci95": None}
            continue
        a, b = (
            np.array([0.0 if r.get(key) is None else float(r[key]) for r in rs])
            for rs in (answerable, b_side)
        )
        ci = None
        if n_boot:
            ci = [float(v) for v in np.percentile(a[idx_a].mean(1) - b[idx_b].mean(1), [2.5, 97.5])]
        out[key] = {"gap": float(a.mean() - b.mean()), "ci95": ci}
    return out
