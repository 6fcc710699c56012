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


# ----------------------------------------------------------------------------- visual judge columns


def _pairs_auroc(score, label):
    """AUROC by counting pairs: P(score of a 1 > score of a 0) + ½ P(tie)."""
    pos = [s for s, y in zip(score, label, strict=True) if y == 1]
    neg = [s for s, y in zip(score, label, strict=True) if y == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


VISUAL = [  # (visual_correct, status, c_v, s_vis)
    (1, "correct", 0.9, 0.8),
    (1, "correct", 0.6, 0.2),
    (1, "correct", None, 0.9),  # unparsed c_v counts 0
    (0, "wrong", 0.7, 0.1),
    (0, "incomplete", 0.3, None),  # no S̃_vis: left out of its AUROC only
    (0, "wrong", 0.6, 0.5),
    (None, "undescribed", 0.8, 0.7),
    (None, "no_vision", None, None),
]


def _visual_records():
    return [
        _r(
            0.5,
            True,
            bench="easy-vqa",
            uid=f"easy-vqa/test/{i}",
            vision_confidence=cv,
            s_vis=s,
            visual_correct=v,
            visual_judgment=st,
        )
        for i, (v, st, cv, s) in enumerate(VISUAL)
    ]


def test_visual_block_counts_and_auroc_by_pair_counting():
    from sklearn.metrics import roc_auc_score

    m = compute_report_metrics([*_visual_records(), _r(0.5, True, bench="other")], n_boot=500)
    v = m["per_benchmark"]["easy-vqa"]["visual"]
    assert (v["n_items"], v["n_judged"], v["n_correct"]) == (8, 6, 3)
    assert (v["n_wrong"], v["n_incomplete"], v["n_undescribed"], v["n_no_vision"]) == (2, 1, 1, 1)
    # c_v over the six judged: correct [0.9, 0.6, 0] vs wrong [0.7, 0.3, 0.6]: 0.9 wins 3, 0.6 wins
    # 1 + ½ (tie), 0 wins none → 4.5 of 9 pairs
    assert v["c_v"]["auroc"] == pytest.approx(4.5 / 9)
    assert v["c_v"]["auroc"] == pytest.approx(
        _pairs_auroc([0.9, 0.6, 0.0, 0.7, 0.3, 0.6], [1, 1, 1, 0, 0, 0])
    )
    # S̃_vis over the five judged with one: [0.8, 0.2, 0.9, 0.1, 0.5] vs [1, 1, 1, 0, 0]
    assert v["s_vis"]["n"] == 5
    assert v["s_vis"]["auroc"] == pytest.approx(roc_auc_score([1, 1, 1, 0, 0], [0.8, 0.2, 0.9, 0.1, 0.5]))
    assert v["s_vis"]["auroc"] == pytest.approx(5 / 6)  # 0.8 wins 2, 0.2 wins 1, 0.9 wins 2
    for block in (v["c_v"], v["s_vis"]):
        low, high = block["ci95"]
        assert 0 <= low <= block["auroc"] <= high <= 1 and high - low > 0.2  # 6 items: a wide interval
    assert m["overall"]["visual"]["n_items"] == 8  # the other benchmark has no judge field
    assert m["per_benchmark"]["other"]["visual"] is None


def test_visual_block_one_class_and_no_intervals():
    recs = [r for r in _visual_records() if r["visual_correct"] != 0]
    v = compute_report_metrics(recs, n_boot=0)["overall"]["visual"]
    assert v["c_v"]["auroc"] is None and "all 3 answers are correct" in v["c_v"]["auroc_note"]
    v = compute_report_metrics(_visual_records(), n_boot=0)["overall"]["visual"]
    assert v["c_v"]["auroc"] == pytest.approx(0.5) and v["c_v"]["ci95"] is None


def _twins(cv_a, cv_b, phi_a, phi_b, paired=True):
    recs = []
    for i, (ca, cb, pa, pb) in enumerate(zip(cv_a, cv_b, phi_a, phi_b, strict=True)):
        uid = f"easy-vqa/test/{i}"
        recs.append(_r(pa, True, bench="easy-vqa", uid=uid, vision_confidence=ca))
        twin = f"{uid}#unanswerable" if paired else f"x/{i}"
        recs.append(
            _r(pb, False, bench="easy-vqa-unanswerable", unanswerable=True, uid=twin, vision_confidence=cb)
        )
    return recs


def test_no_image_gap_by_hand_and_paired_interval():
    cv_a = [0.9, 0.8, 0.5, 0.7, None]
    cv_b = [0.6, 0.5, 0.2, 0.4, None]  # every pair 0.3 apart (None = 0 on both sides)
    phi_a, phi_b = [0.9, 0.2, 0.6, 0.5, 0.4], [0.1, 0.1, 0.1, 0.1, None]
    m = compute_report_metrics(_twins(cv_a, cv_b, phi_a, phi_b), n_boot=400)
    g = m["per_benchmark"]["easy-vqa"]["no_image_gap"]
    assert g["paired"] and (g["n_answerable"], g["n_blank"]) == (5, 5)
    assert g["vision_confidence"]["gap"] == pytest.approx((2.9 - 1.7) / 5)
    # pairs resampled together and each pair 0.3 apart except the (0, 0) one: every draw's gap in [0, 0.3]
    low, high = g["vision_confidence"]["ci95"]
    assert 0 <= low <= (2.9 - 1.7) / 5 <= high <= 0.3 + 1e-12
    assert g["confidence"]["gap"] == pytest.approx(2.6 / 5 - 0.4 / 5)
    assert m["overall"]["no_image_gap"]["confidence"]["gap"] == pytest.approx(
        m["overall"]["unanswerable_gap"]
    )
    # constant pair differences: the paired interval has zero width; unpaired draws do not
    same = [0.3] * 4
    m = compute_report_metrics(_twins([0.9, 0.8, 0.5, 0.7], same, [0.9, 0.8, 0.5, 0.7], [0.6, 0.5, 0.2, 0.4]))
    assert m["overall"]["no_image_gap"]["confidence"]["ci95"] == pytest.approx([0.3, 0.3])
    m = compute_report_metrics(
        _twins([0.9, 0.8, 0.5, 0.7], same, [0.9, 0.8, 0.5, 0.7], [0.6, 0.5, 0.2, 0.4], paired=False)
    )
    g = m["overall"]["no_image_gap"]
    assert not g["paired"] and g["confidence"]["gap"] == pytest.approx(0.3)
    assert g["confidence"]["ci95"][1] - g["confidence"]["ci95"][0] > 0.1


def test_no_image_gap_without_vision_confidences_is_none():
    recs = _twins([None] * 3, [None] * 3, [0.5, 0.6, 0.7], [0.1, 0.2, 0.3])  # e.g. the RLCR protocol
    g = compute_report_metrics(recs, n_boot=0)["overall"]["no_image_gap"]
    assert g["vision_confidence"] == {"gap": None, "ci95": None}
    assert g["confidence"]["gap"] == pytest.approx(0.4) and g["confidence"]["ci95"] is None
    assert compute_report_metrics(RECORDS[:4])["overall"]["no_image_gap"] is None


def test_report_md_has_the_visual_table(tmp_path):
    recs = [*_visual_records(), *_twins([0.9], [0.2], [0.8], [0.1])[1:]]
    recs[-1]["uid"] = "easy-vqa/test/0#unanswerable"
    m = write_report(recs, tmp_path, n_boot=200)
    md = (tmp_path / "report.md").read_text()
    v = m["overall"]["visual"]
    assert "AUROC(c_v, visual)" in md and "no-image gap c_v" in md
    lo, hi = v["c_v"]["ci95"]
    assert f"| 6 / 8 | 3 | 1 | 1 | 0.500 [{lo:.3f}, {hi:.3f}] |" in md
    assert "| easy-vqa |" in md and "+0." in md
