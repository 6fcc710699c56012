"""K̄, H̄, S, S̃_vis and TAR weights against hand computations; degenerate batches."""

from __future__ import annotations

import math

import pytest
import torch

from vlcal_verl.config import TARConfig, VCEConfig
from vlcal_verl.tar import apply_tar, tar_weights
from vlcal_verl.vce import normalize_visual_certainty, visual_certainty

EPS = 1e-8


def _sig(x):
    return 1 / (1 + math.exp(-x))


def test_visual_certainty_by_hand_and_signals():
    kl = torch.tensor([[0.2, 0.4, 9.0], [1.0, 1.0, 1.0], [5.0, 5.0, 5.0]])
    h = torch.tensor([[2.0, 4.0, 9.0], [0.5, 0.5, 0.5], [1.0, 1.0, 1.0]])
    m = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]], dtype=torch.bool)
    k_bar, h_bar, s = visual_certainty(kl, h, m)
    assert k_bar[0].item() == pytest.approx(0.3) and h_bar[0].item() == pytest.approx(3.0)
    assert s[0].item() == pytest.approx(math.log(0.3 + EPS) - math.log(3.0 + EPS))
    assert s[1].item() == pytest.approx(math.log(1 + EPS) - math.log(0.5 + EPS))
    assert all(math.isnan(v[2].item()) for v in (k_bar, h_bar, s))
    s_kl = visual_certainty(kl, h, m, VCEConfig(signal="kl"))[2]
    s_h = visual_certainty(kl, h, m, VCEConfig(signal="entropy"))[2]
    assert s_kl[0].item() == pytest.approx(math.log(0.3)) and s_h[0].item() == pytest.approx(-math.log(3.0))
    with pytest.raises(ValueError, match="signal"):
        visual_certainty(kl, h, m, VCEConfig(signal="both-ish"))


def test_visual_certainty_guards_non_finite():
    kl = torch.tensor([[float("inf"), 1.0], [float("nan"), 1.0], [1.0, 1.0]])
    h = torch.ones(3, 2)
    m = torch.tensor([[1, 1], [0, 1], [1, 1]], dtype=torch.bool)
    _, _, s = visual_certainty(kl, h, m)
    # inf inside the span → no S; NaN outside the span is ignored
    assert (
        math.isnan(s[0].item()) and s[1].item() == pytest.approx(0.0, abs=1e-7) and math.isfinite(s[2].item())
    )


def test_normalize_by_hand():
    s = torch.tensor([1.0, 2.0, float("nan"), 6.0])
    out = normalize_visual_certainty(s)
    mean, std = 3.0, math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 3)  # population std
    expect = [_sig((1 - mean) / std), _sig((2 - mean) / std), float("nan"), _sig((6 - mean) / std)]
    for got, want in zip(out.tolist(), expect, strict=True):
        assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want)


@pytest.mark.parametrize(
    "s,expect",
    [
        ([3.0], [0.5]),  # one sample
        ([2.0, 2.0, 2.0 + 1e-9], [0.5, 0.5, 0.5]),  # std below 1e-6
        ([float("nan"), float("nan")], [float("nan"), float("nan")]),  # no spans
        ([float("inf"), 1.0, float("-inf")], [float("nan"), 0.5, float("nan")]),
        ([], []),
    ],
)
def test_normalize_degenerate(s, expect):
    out = normalize_visual_certainty(torch.tensor(s, dtype=torch.float64)).tolist()
    assert len(out) == len(expect)
    for got, want in zip(out, expect, strict=True):
        assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want)


def _hand_weights(kl, h, w_min=0.9, w_max=1.1):
    s = [math.log(k + EPS) - math.log(e + EPS) for k, e in zip(kl, h, strict=True)]
    n = len(s)
    mean = sum(s) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in s) / (n - 1)) if n > 1 else 0.0
    z = [(x - mean) / std if std >= 1e-6 else 0.0 for x in s]
    return [w_max - (w_max - w_min) * _sig(v) for v in z]


def test_tar_weights_by_hand():
    kl = torch.tensor([[0.1, 0.5, 2.0, 7.0]], dtype=torch.float64)
    h = torch.tensor([[1.0, 2.0, 0.5, 3.0]], dtype=torch.float64)
    scope = torch.tensor([[0, 1, 1, 1]], dtype=torch.bool)
    w = tar_weights(kl, h, scope)
    assert w[0, 0].item() == 1.0
    assert w[0, 1:].tolist() == pytest.approx(_hand_weights([0.5, 2.0, 7.0], [2.0, 0.5, 3.0]))
    # the most certain token (largest KL/H) gets the softest weight, the least certain the largest
    assert w[0, 2] == w[0, 1:].min() and w[0, 1] == w[0, 1:].max()
    w1 = tar_weights(kl, h, torch.tensor([[0, 0, 1, 0]], dtype=torch.bool))
    assert w1[0, 2].item() == pytest.approx(1.0)  # single token: z = 0 → midpoint
    with pytest.raises(ValueError, match="w_min"):
        tar_weights(kl, h, scope, w_min=1.2, w_max=1.1)


def test_apply_tar_touches_only_negative_span_tokens():
    adv = torch.tensor(
        [[-1.0, -1.0, -1.0, -1.0, -1.0], [0.5, 0.5, 0.5, 0.5, 0.5], [-2.0, -2.0, -2.0, 0.0, 0.0]]
    )
    kl = torch.tensor([[0.1, 0.5, 2.0, 7.0, 1.0], [0.1, 0.5, 2.0, 7.0, 1.0], [1.0, 3.0, 1.0, 0.0, 0.0]])
    h = torch.tensor([[1.0, 2.0, 0.5, 3.0, 1.0], [1.0, 2.0, 0.5, 3.0, 1.0], [2.0, 1.0, 1.0, 0.0, 0.0]])
    span = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    resp = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    new, stats = apply_tar(adv, kl, h, span, resp, TARConfig())
    want = _hand_weights([0.5, 2.0, 7.0], [2.0, 0.5, 3.0])
    assert new[0, 1:4].tolist() == pytest.approx([-w for w in want])
    assert new[0, 0] == -1.0 and new[0, 4] == -1.0  # outside the span
    assert torch.equal(new[1], adv[1])  # A ≥ 0 untouched
    assert torch.equal(new[2], adv[2])  # no span
    assert stats["tar/reweighted_fraction"] == pytest.approx(3 / 13)
    assert stats["tar/weight_mean"] == pytest.approx(sum(want) / 3)
    assert stats["tar/weight_min"] == pytest.approx(min(want)) and stats["tar/weight_max"] == pytest.approx(
        max(want)
    )


def test_apply_tar_response_scope_z_scores_whole_response():
    adv = -torch.ones(1, 4)
    kl = torch.tensor([[0.1, 0.5, 2.0, 7.0]])
    h = torch.tensor([[1.0, 2.0, 0.5, 3.0]])
    span = torch.tensor([[0, 1, 1, 0]], dtype=torch.bool)
    resp = torch.ones(1, 4, dtype=torch.bool)
    new, _ = apply_tar(adv, kl, h, span, resp, TARConfig(scope="response"))
    want = _hand_weights([0.1, 0.5, 2.0, 7.0], [1.0, 2.0, 0.5, 3.0])
    assert new[0].tolist() == pytest.approx([-1.0, -want[1], -want[2], -1.0], abs=1e-6)


def test_apply_tar_no_reweighting_gives_nan_weight_stats():
    adv = torch.ones(2, 3)
    _, stats = apply_tar(
        adv,
        torch.ones(2, 3),
        torch.ones(2, 3),
        torch.ones(2, 3, dtype=torch.bool),
        torch.ones(2, 3, dtype=torch.bool),
    )
    assert stats["tar/reweighted_fraction"] == 0.0 and math.isnan(stats["tar/weight_mean"])
