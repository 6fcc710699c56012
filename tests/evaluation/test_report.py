"""write_report: metric values by hand, unparsed-as-0, the no-image gap, files, S̃_vis agreement."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from scipy.stats import kendalltau, spearmanr

from vlcal_verl.evaluation.report import compute_report_metrics, visual_agreement, write_report


def _r(conf, correct, bench="b1", unanswerable=False, uid=None, **kw):
    return {
        "benchmark": bench,
        "confidence": conf,
        "correct": correct,
        "unanswerable": unanswerable,
        "uid": uid,
        **kw,
    }


RECORDS = [
    _r(0.9, True, vision_confidence=0.8, reasoning_confidence=1.0),
    _r(0.8, True, vision_confidence=0.6, reasoning_confidence=1.0),
    _r(0.3, False, vision_confidence=0.2, reasoning_confidence=0.4),
    _r(None, False, parse_ok=False),  # unparsed: confidence counts as 0
    _r(0.1, True, bench="b1-unanswerable", unanswerable=True),
    _r(None, False, bench="b1-unanswerable", unanswerable=True),
]


def test_metrics_by_hand():
    m = compute_report_metrics(RECORDS, "t")["overall"]
    # answerable: conf [0.9, 0.8, 0.3, 0], correct [1, 1, 0, 0]
    assert m["n"] == 4
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["parse_rate"] == pytest.approx(0.75)
    # Brier: (0.01 + 0.04 + 0.09 + 0) / 4
    assert m["brier"] == pytest.approx(0.035)
    # ECE bins: 0.0 → [0] acc 0 conf 0; 0.3 → acc 0 conf .3; 0.8 → acc 1 conf .8; 0.9 → acc 1 conf .9
    assert m["ece"] == pytest.approx((0 + 0.3 + 0.2 + 0.1) / 4)
    # every correct answer is more confident than every wrong one
    assert m["auroc"] == pytest.approx(1.0)
    assert m["mean_vision_confidence"] == pytest.approx((0.8 + 0.6 + 0.2) / 3)
    # parsed only: [0.9, 0.8, 0.3] vs [1, 1, 0]
    assert m["parsed_only"]["n"] == 3
    assert m["parsed_only"]["accuracy"] == pytest.approx(2 / 3)
    # gap: mean Φ answerable (2.0/4 = 0.5) − mean Φ unanswerable ((0.1 + 0)/2 = 0.05)
    assert m["unanswerable_gap"] == pytest.approx(0.45)
    assert m["unanswerable"]["n"] == 2


def test_per_benchmark_groups_unanswerable_with_its_base():
    m = compute_report_metrics([*RECORDS, _r(1.0, True, bench="b2")], "t")
    assert set(m["per_benchmark"]) == {"b1", "b2"}
    assert m["per_benchmark"]["b1"]["unanswerable_gap"] == pytest.approx(0.45)
    assert m["per_benchmark"]["b2"]["unanswerable_gap"] is None
    assert m["overall"]["n"] == 5


def test_bad_records_name_the_field():
    with pytest.raises(ValueError, match="record 1: missing field 'correct'"):
        compute_report_metrics([_r(0.5, True), {"confidence": 0.5}])
    with pytest.raises(ValueError, match="'confidence'"):
        compute_report_metrics([_r(1.5, True)])


def test_files_written_and_pngs_non_trivial(tmp_path):
    recs = [*RECORDS, _r(0.6, False, bench="b2"), _r(0.7, True, bench="b2")]
    m = write_report(recs, tmp_path, title="demo")
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["overall"]["accuracy"] == pytest.approx(m["overall"]["accuracy"])
    for name in ("report.md", "report.html", "reliability.png", "risk_coverage.png", "reliability_b1.png"):
        assert (tmp_path / name).is_file(), name
    png = np.asarray(Image.open(tmp_path / "reliability.png").convert("L"), dtype=float)
    assert (tmp_path / "reliability.png").stat().st_size > 10_000 and png.std() > 5
    md = (tmp_path / "report.md").read_text()
    assert "| **overall** | 6 |" in md and "| b2 | 2 |" in md
    assert "data:image/png;base64," in (tmp_path / "report.html").read_text()


def test_visual_agreement_against_scipy_and_sklearn():
    rng = np.random.default_rng(0)
    s = rng.random(40)
    j = (s + rng.normal(0, 0.3, 40) > 0.5).astype(float)
    recs = [_r(0.5, True, uid=str(i), s_vis=float(v)) for i, v in enumerate(s)]
    recs.append(_r(0.5, True, uid="no-judgment", s_vis=0.3))
    out = visual_agreement(recs, {str(i): float(v) for i, v in enumerate(j)})
    from sklearn.metrics import roc_auc_score

    assert out["n"] == 40 and out["n_missing"] == 1
    assert out["auroc"] == pytest.approx(roc_auc_score(j, s))
    assert out["spearman"] == pytest.approx(spearmanr(s, j).statistic)
    assert out["kendall"] == pytest.approx(kendalltau(s, j).statistic)


def test_numpy_confidences_are_accepted():
    m = compute_report_metrics([_r(np.float32(0.5), True), _r(np.float64(0.25), False)])
    assert m["overall"]["mean_conf"] == pytest.approx(0.375)
