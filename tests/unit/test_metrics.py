"""Calibration metrics against hand computations, brute force, and torchmetrics/scikit-learn-free math."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from vlcal_verl.metrics import (
    accuracy,
    aurc,
    auroc,
    auroc_with_reason,
    bin_indices,
    bootstrap_ci,
    bootstrap_indices,
    bootstrap_metrics,
    brier_score,
    calibration_metrics,
    expected_calibration_error,
    plot_reliability,
    plot_risk_coverage,
    reliability_bins,
    risk_coverage_curve,
)

# ----------------------------------------------------------------------------- ECE and bins


def test_grid_confidences_land_in_their_own_bins():
    grid = [i / 10 for i in range(11)] + [0.1 * i for i in range(11)] + [0.3, 0.6, 0.7, 1 - 0.7, 0.1 + 0.2]
    expected = [min(i, 9) for i in range(11)] * 2 + [3, 6, 7, 3, 3]
    assert bin_indices(grid).tolist() == expected
    assert bin_indices([0.29999, 0.39999, 0.999999]).tolist() == [
        2,
        3,
        9,
    ]  # real values below an edge stay below


def test_ece_hand_computed_on_grid_edges():
    # bin 3: {0.3 ✓, 0.3 ✗} acc 0.5 conf 0.3 → gap 0.2; bin 7: {0.7 ✓} gap 0.3; bin 9: {1.0 ✗, 0.9 ✓} acc .5 conf .95
    conf = [0.3, 0.3, 0.7, 1.0, 0.9]
    corr = [1, 0, 1, 0, 1]
    expected = (2 / 5) * 0.2 + (1 / 5) * 0.3 + (2 / 5) * 0.45
    assert expected_calibration_error(conf, corr) == pytest.approx(expected, abs=1e-12)
    bins = reliability_bins(conf, corr)
    assert [b["count"] for b in bins] == [0, 0, 0, 2, 0, 0, 0, 1, 0, 2]
    assert bins[3] == {
        "lower": 0.3,
        "upper": 0.4,
        "count": 2,
        "accuracy": 0.5,
        "mean_confidence": 0.3,
        "gap": pytest.approx(0.2),
    }
    assert bins[0]["accuracy"] is None and bins[0]["gap"] is None


def test_ece_perfect_and_worst_cases():
    assert expected_calibration_error([1.0, 1.0, 0.0], [1, 1, 0]) == 0.0
    assert expected_calibration_error([1.0, 0.0], [0, 1]) == 1.0
    assert expected_calibration_error([0.55] * 4, [1, 1, 0, 0]) == pytest.approx(0.05)


def _torchmetrics_ece(conf, corr, dtype):
    import torch
    from torchmetrics.classification import BinaryCalibrationError

    metric = BinaryCalibrationError(n_bins=10, norm="l1")
    return float(metric(torch.tensor(conf, dtype=dtype), torch.tensor(corr)))


@pytest.mark.parametrize("seed", range(5))
def test_ece_matches_torchmetrics_on_random_data(seed):
    """Continuous confidences in [0, 1) never hit an edge: both conventions must agree exactly."""
    import torch

    rng = np.random.default_rng(seed)
    conf = rng.uniform(0, 1, size=2000) * 0.999999
    corr = (rng.uniform(size=2000) < conf**1.5).astype(int)
    ours = expected_calibration_error(conf, corr)
    assert ours == pytest.approx(_torchmetrics_ece(conf, corr, torch.float64), abs=1e-9)


def test_ece_torchmetrics_edge_conventions():
    """torchmetrics bins with ``bucketize(c, linspace(0, 1, 11), right=True)``:

    * 1.0 falls in an extra 11th bin instead of the closed last bin [0.9, 1.0] → ECE differs when
      that bin mixes 1.0 with other values;
    * edges are float-fragile in float64: 0.3 (= 3/10) < linspace's 0.30000000000000004 lands in bin 2.
    Without 1.0 and with float32 inputs (whose edge values coincide) they agree on the 0.1 grid.
    """
    import torch

    conf = [i / 10 for i in range(10)] * 3
    corr = [(i * 7 + j) % 3 == 0 for j in range(3) for i in range(10)]
    assert expected_calibration_error(conf, corr) == pytest.approx(
        _torchmetrics_ece(conf, corr, torch.float32)
    )
    # the float64 fragility: 0.3 joins 0.2 in torchmetrics' bin 2, stays in bin 3 here
    assert expected_calibration_error([0.2, 0.3], [0, 1]) == pytest.approx((0.2 + 0.7) / 2)
    assert _torchmetrics_ece([0.2, 0.3], [0, 1], torch.float64) == pytest.approx(abs(0.5 - 0.25))
    mixed_conf, mixed_corr = [0.9, 1.0], [1, 0]
    assert expected_calibration_error(mixed_conf, mixed_corr) == pytest.approx(0.45)  # one bin: |0.5 − 0.95|
    assert _torchmetrics_ece(mixed_conf, mixed_corr, torch.float32) == pytest.approx(0.55)  # (0.1 + 1.0) / 2


# ----------------------------------------------------------------------------- AUROC, Brier, accuracy


def _auroc_by_pairs(conf, corr):
    pos = [c for c, y in zip(conf, corr, strict=True) if y]
    neg = [c for c, y in zip(conf, corr, strict=True) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auroc_hand_computed_and_by_pair_counting():
    assert auroc([0.9, 0.8, 0.4, 0.6], [1, 1, 0, 0]) == 1.0
    assert auroc([0.5, 0.5], [1, 0]) == 0.5
    assert auroc([0.2, 0.8, 0.6, 0.6], [1, 0, 1, 0]) == pytest.approx(0.5 / 4)  # only the 0.6-0.6 tie scores
    rng = np.random.default_rng(1)
    conf = rng.integers(0, 11, size=300) / 10
    corr = rng.uniform(size=300) < conf
    assert auroc(conf, corr) == pytest.approx(_auroc_by_pairs(conf, corr))


def test_auroc_single_class_is_none_with_reason():
    value, reason = auroc_with_reason([0.2, 0.9], [1, 1])
    assert value is None and "all 2 answers are correct" in reason
    assert auroc([0.2, 0.9], [0, 0]) is None
    metrics = calibration_metrics([0.2, 0.9], [False, False])
    assert metrics["auroc"] is None and "wrong" in metrics["auroc_note"]


def test_brier_and_accuracy_hand_computed():
    assert brier_score([1.0, 0.5], [1, 0]) == pytest.approx((0 + 0.25) / 2)
    assert brier_score([0.7, 0.2, 0.9], [True, False, False]) == pytest.approx((0.09 + 0.04 + 0.81) / 3)
    assert brier_score([0.3], [1]) == pytest.approx(0.49)  # a single class is fine
    assert accuracy([1, 0, 1, 1]) == 0.75


# ----------------------------------------------------------------------------- risk–coverage and AURC


def _aurc_brute_force(conf, corr):
    """Thresholds at every distinct confidence, highest first; area of the step curve."""
    conf, corr = np.asarray(conf, float), np.asarray(corr, float)
    area, prev_cov = 0.0, 0.0
    for t in sorted(set(conf.tolist()), reverse=True):
        kept = conf >= t
        cov = kept.mean()
        area += (cov - prev_cov) * (1 - corr[kept].mean())
        prev_cov = cov
    return area


def test_risk_coverage_hand_computed_with_ties():
    cov, risk = risk_coverage_curve([0.9, 0.5, 0.5, 0.1], [1, 1, 0, 0])
    assert cov.tolist() == [0.25, 0.75, 1.0]
    assert risk.tolist() == pytest.approx([0.0, 1 / 3, 0.5])
    assert aurc([0.9, 0.5, 0.5, 0.1], [1, 1, 0, 0]) == pytest.approx(0.25 * 0 + 0.5 / 3 + 0.25 * 0.5)


@pytest.mark.parametrize("seed", range(4))
def test_aurc_matches_brute_force_and_ignores_order_within_ties(seed):
    rng = np.random.default_rng(seed)
    conf = rng.integers(0, 11, size=200) / 10
    corr = rng.uniform(size=200) < conf
    assert aurc(conf, corr) == pytest.approx(_aurc_brute_force(conf, corr))
    perm = rng.permutation(200)
    assert aurc(conf[perm], corr[perm]) == pytest.approx(aurc(conf, corr))


def test_aurc_equals_mean_topk_risk_without_ties():
    rng = np.random.default_rng(7)
    conf = rng.uniform(size=150)
    corr = rng.uniform(size=150) < conf
    order = np.argsort(-conf)
    wrong = 1 - corr[order]
    mean_topk = np.mean([wrong[: k + 1].mean() for k in range(150)])
    assert aurc(conf, corr) == pytest.approx(mean_topk)


# ----------------------------------------------------------------------------- summary, validation, plots


def test_calibration_metrics_keys_and_values():
    conf, corr = np.array([0.9, 0.8, 0.3, 0.0]), [1, 0, 1, 0]
    m = calibration_metrics(conf, corr, parsed=[True, True, True, False])
    assert m["n"] == 4 and m["accuracy"] == 0.5 and m["parse_rate"] == 0.75
    assert m["mean_conf_correct"] == pytest.approx(0.6) and m["mean_conf_wrong"] == pytest.approx(0.4)
    assert m["ece"] == pytest.approx(expected_calibration_error(conf, corr))
    assert m["auroc"] == pytest.approx(_auroc_by_pairs(conf, corr))
    assert {"brier", "aurc", "mean_conf"} <= set(m)


@pytest.mark.parametrize(
    ("conf", "corr", "match"),
    [
        ([0.5, 1.2], [1, 0], r"confidence\[1\]"),
        ([0.5, float("nan")], [1, 0], r"confidence\[1\]"),
        ([0.5], [1, 0], "same length"),
        ([], [], "empty"),
        ([0.5, 0.5], [1, 2], r"correct\[1\]"),
        ([[0.5]], [1], "confidence must be 1-D"),
    ],
)
def test_bad_input_names_the_argument(conf, corr, match):
    with pytest.raises(ValueError, match=match):
        calibration_metrics(conf, corr)


def test_bad_n_bins_and_parsed_are_named():
    with pytest.raises(ValueError, match="n_bins"):
        expected_calibration_error([0.5], [1], n_bins=0)
    with pytest.raises(ValueError, match="parsed"):
        calibration_metrics([0.5], [1], parsed=[True, False])


def _png_pixels(path):
    import matplotlib.image

    return matplotlib.image.imread(str(path))


def test_reliability_plot_is_a_real_png(tmp_path):
    rng = np.random.default_rng(0)
    conf = rng.integers(0, 11, size=400) / 10
    out = plot_reliability(conf, rng.uniform(size=400) < conf, tmp_path / "sub" / "rel.png", title="test")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 10_000
    pixels = _png_pixels(out)
    assert pixels.shape[0] > 300 and pixels.std() > 0.05  # not a blank image


def test_risk_coverage_plot_has_all_curves(tmp_path):
    rng = np.random.default_rng(0)
    conf = rng.uniform(size=300)
    corr = rng.uniform(size=300) < conf
    out = plot_risk_coverage(
        {"calibrated": (conf, corr), "random": (rng.uniform(size=300), corr)}, tmp_path / "rc.png"
    )
    assert out.stat().st_size > 10_000 and _png_pixels(out).std() > 0.05
    with pytest.raises(ValueError, match="curves"):
        plot_risk_coverage({}, tmp_path / "x.png")


# ----------------------------------------------------------------------------- bootstrap


def _brute_force_draws(conf, corr, idx):
    """One plain Python loop over the draws, each scored by the point metrics (scikit-learn AUROC/Brier)."""
    conf, corr = np.asarray(conf), np.asarray(corr)
    rows = []
    for draw in idx:
        c, y = conf[draw].tolist(), corr[draw].tolist()
        auc = auroc(c, y)
        rows.append(
            {
                "accuracy": accuracy(y),
                "auroc": np.nan if auc is None else auc,
                "ece": expected_calibration_error(c, y),
                "brier": brier_score(c, y),
                "aurc": aurc(c, y),
            }
        )
    return {k: np.array([r[k] for r in rows]) for k in rows[0]}


def _sample(n, seed):
    rng = np.random.default_rng(seed)
    conf = rng.integers(0, 11, n) / 10  # a 0.1 grid: many ties, as parsed confidences have
    corr = (rng.random(n) < 0.3 + 0.5 * conf).astype(int)
    return conf, corr


def test_bootstrap_draws_equal_a_brute_force_resampler():
    conf, corr = _sample(37, 1)
    idx = bootstrap_indices(len(conf), 300, seed=7)
    assert idx.shape == (300, 37) and (idx == np.random.default_rng(7).integers(0, 37, (300, 37))).all()
    fast = bootstrap_metrics(conf, corr, idx)
    slow = _brute_force_draws(conf, corr, idx)
    for k in slow:
        np.testing.assert_allclose(fast[k], slow[k], rtol=0, atol=1e-12, err_msg=k)


def test_bootstrap_auroc_undefined_draws_are_nan_and_left_out():
    conf, corr = [0.9, 0.2, 0.5], [1, 0, 1]
    idx = np.array([[0, 0, 2], [0, 1, 2], [1, 1, 1]])  # only correct; both; only wrong
    fast = bootstrap_metrics(conf, corr, idx)
    assert np.isnan(fast["auroc"][0]) and np.isnan(fast["auroc"][2]) and fast["auroc"][1] == 1.0
    assert bootstrap_ci([0.5, 0.4], [1, 1], n_boot=50)["auroc"] is None


def test_bootstrap_ci_is_the_percentile_interval_of_the_brute_force_draws():
    conf, corr = _sample(60, 2)
    ci = bootstrap_ci(conf, corr, n_boot=1000, seed=3, chunk=128)  # chunks must not change the draws
    slow = _brute_force_draws(conf, corr, bootstrap_indices(60, 1000, seed=3))
    point = calibration_metrics(conf, corr)
    for k, draws in slow.items():
        draws = draws[np.isfinite(draws)]
        assert ci[k] == pytest.approx(np.percentile(draws, [2.5, 97.5]).tolist(), abs=1e-12), k
        assert ci[k][0] <= point[k] <= ci[k][1], k  # the point estimate sits inside here


def test_bootstrap_interval_narrows_with_more_items():
    small = bootstrap_ci(*_sample(50, 4), n_boot=1000)
    large = bootstrap_ci(*_sample(2000, 4), n_boot=1000)
    for k in ("accuracy", "brier", "auroc"):
        assert large[k][1] - large[k][0] < 0.5 * (small[k][1] - small[k][0]), k


def test_paired_difference_equals_brute_force_and_is_tighter_than_unpaired():
    from vlcal_verl.metrics import bootstrap_difference

    conf_a, corr_a = _sample(80, 5)
    rng = np.random.default_rng(9)
    corr_b = np.where(rng.random(80) < 0.85, corr_a, 1 - corr_a)  # B mostly agrees with A item by item
    conf_b = conf_a
    paired = bootstrap_difference((conf_a, corr_a), (conf_b, corr_b), paired=True, n_boot=1000, seed=0)
    idx = bootstrap_indices(80, 1000, seed=0)
    da, db = _brute_force_draws(conf_a, corr_a, idx), _brute_force_draws(conf_b, corr_b, idx)
    for k in da:
        d = (db[k] - da[k])[np.isfinite(db[k] - da[k])]
        assert paired[k]["ci95"] == pytest.approx(np.percentile(d, [2.5, 97.5]).tolist(), abs=1e-12), k
    assert paired["accuracy"]["diff"] == pytest.approx(corr_b.mean() - corr_a.mean())
    unpaired = bootstrap_difference((conf_a, corr_a), (conf_b, corr_b), paired=False, n_boot=1000, seed=0)
    width = {
        p: r["accuracy"]["ci95"][1] - r["accuracy"]["ci95"][0] for p, r in (("p", paired), ("u", unpaired))
    }
    assert width["p"] < width["u"]
    with pytest.raises(ValueError, match="same items"):
        bootstrap_difference((conf_a, corr_a), (conf_a[:5], corr_a[:5]), paired=True)
