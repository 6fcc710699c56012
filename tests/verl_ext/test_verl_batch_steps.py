"""The trainer's new steps as pure functions, against hand-computed values (docs/design.md §3-§5)."""

from __future__ import annotations

import math

import pytest
import torch

from vlcal_verl.config import TARConfig, VCEConfig
from vlcal_verl.verl_ext.batch import (
    calibration_step_metrics,
    reward_positions,
    span_mask_from_tensor,
    spans_to_tensor,
    tar_step,
    tensor_to_spans,
    visual_reward_step,
)


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _batch():
    """3 samples, R = 4: sample rewards 1.5 / −0.5 / 0.2 on the last token; spans [0,2), [0,3), none."""
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]])
    scores = torch.zeros(3, 4)
    scores[0, 3], scores[1, 2], scores[2, 1] = 1.5, -0.5, 0.2
    spans = spans_to_tensor([(0, 2), (0, 3), None])
    kl = torch.tensor([[1.0, 3.0, 9.0, 9.0], [4.0, 4.0, 4.0, 0.0], [5.0, 5.0, 0.0, 0.0]])
    ent = torch.tensor([[2.0, 2.0, 9.0, 9.0], [1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    return scores, mask, spans, kl, ent


def test_visual_reward_step_hand_computed():
    scores, mask, spans, kl, ent = _batch()
    span_mask = span_mask_from_tensor(spans, mask)
    # K̄/H̄: sample 0 → 2/2 (S = 0), sample 1 → 4/1 (S = log 4), sample 2 has no span.
    # S̃ = sigmoid(z) with z = ∓1 (two values, population std) → σ(−1), σ(1).
    c_v = [0.3, 0.9, 0.5]
    new, s_tilde, metrics = visual_reward_step(scores, mask, c_v, kl, ent, span_mask, w_vis=0.4)
    assert s_tilde[0].item() == pytest.approx(sig(-1.0), abs=1e-6)
    assert s_tilde[1].item() == pytest.approx(sig(1.0), abs=1e-6)
    assert math.isnan(s_tilde[2].item())
    expected = scores.clone()
    expected[0, 3] += 0.4 * -((0.3 - sig(-1.0)) ** 2)
    expected[1, 2] += 0.4 * -((0.9 - sig(1.0)) ** 2)
    expected[2, 1] += 0.4 * -1.0  # no S̃ → visual term −1
    torch.testing.assert_close(new, expected)
    assert metrics["vce/span_rate"] == pytest.approx(2 / 3)
    assert metrics["vce/k_bar/mean"] == pytest.approx(3.0)
    assert metrics["vce/h_bar/mean"] == pytest.approx(1.5)


def test_visual_reward_step_ignores_padding_rows():
    scores, mask, spans, kl, ent = _batch()
    # a 4th (verl padding) row with a span and extreme S must not move S̃ or get a reward
    scores = torch.cat([scores, torch.tensor([[0.0, 0.0, 0.0, 7.0]])])
    mask = torch.cat([mask, torch.ones(1, 4, dtype=mask.dtype)])
    spans = torch.cat([spans, torch.tensor([[0, 4]])])
    kl = torch.cat([kl, torch.full((1, 4), 1e4)])
    ent = torch.cat([ent, torch.full((1, 4), 1e-4)])
    valid = torch.tensor([True, True, True, False])
    new, s_tilde, _ = visual_reward_step(
        scores,
        mask,
        [0.3, 0.9, 0.5, 0.1],
        kl,
        ent,
        span_mask_from_tensor(spans, mask),
        w_vis=0.4,
        valid=valid,
    )
    assert s_tilde[0].item() == pytest.approx(sig(-1.0), abs=1e-6)
    assert math.isnan(s_tilde[3].item())
    assert new[3].tolist() == [0.0, 0.0, 0.0, 7.0]


def test_visual_reward_signal_ablation_kl_only():
    scores, mask, spans, kl, ent = _batch()
    cfg = VCEConfig(signal="kl")  # S = log K̄: log 2 vs log 4 → still z = ∓1
    _, s_tilde, _ = visual_reward_step(
        scores, mask, [0.3, 0.9, 0.5], kl, ent, span_mask_from_tensor(spans, mask), w_vis=0.4, vce_cfg=cfg
    )
    assert s_tilde[:2].tolist() == pytest.approx([sig(-1.0), sig(1.0)], abs=1e-6)


def test_tar_step_hand_computed():
    # one sample, span = tokens 0,1; s_t = log KL − log H = (1, 0); Bessel z = (+1/√2, −1/√2)
    adv = torch.tensor([[-1.0, -1.0, 2.0], [0.5, 0.5, 0.5]])
    kl = torch.tensor([[math.e, 1.0, 1.0], [math.e, 1.0, 1.0]])
    ent = torch.ones(2, 3)
    mask = torch.ones(2, 3, dtype=torch.long)
    span = span_mask_from_tensor(spans_to_tensor([(0, 2), (0, 2)]), mask)
    new, stats = tar_step(adv, kl, ent, span, mask, TARConfig(w_min=0.9, w_max=1.1))
    z = 1 / math.sqrt(2)
    w0, w1 = 1.1 - 0.2 * sig(z), 1.1 - 0.2 * sig(-z)
    torch.testing.assert_close(new[0], torch.tensor([-w0, -w1, 2.0]), atol=1e-5, rtol=0)
    assert new[1].tolist() == [0.5, 0.5, 0.5]  # positive advantages untouched
    assert stats["tar/weight_min"] == pytest.approx(w0, abs=1e-5)
    assert stats["tar/weight_max"] == pytest.approx(w1, abs=1e-5)


def test_tar_step_skips_invalid_rows():
    adv = torch.full((1, 3), -1.0)
    kl = torch.tensor([[math.e, 1.0, 1.0]])
    span = torch.tensor([[True, True, False]])
    new, _ = tar_step(
        adv, kl, torch.ones(1, 3), span, torch.ones(1, 3), TARConfig(), valid=torch.tensor([False])
    )
    assert new.tolist() == adv.tolist()


def test_spans_round_trip():
    spans = [(3, 7), None, (0, 1)]
    assert tensor_to_spans(spans_to_tensor(spans)) == spans
    m = span_mask_from_tensor(spans_to_tensor(spans), torch.tensor([[1] * 5, [1] * 5, [0] * 5]))
    assert m.tolist() == [[False, False, False, True, True], [False] * 5, [False] * 5]


def test_calibration_step_metrics_hand_computed():
    infos = [
        {
            "accuracy": 1.0,
            "parse_ok": True,
            "confidence": 0.9,
            "vision_confidence": 0.8,
            "reasoning_confidence": 1.0,
        },
        {
            "accuracy": 0.0,
            "parse_ok": True,
            "confidence": 0.2,
            "vision_confidence": 0.4,
            "reasoning_confidence": 0.1,
        },
        {
            "accuracy": 0.0,
            "parse_ok": False,
            "confidence": None,
            "vision_confidence": None,
            "reasoning_confidence": None,
        },
        {
            "accuracy": 1.0,
            "parse_ok": True,
            "confidence": 0.7,
            "vision_confidence": 0.6,
            "reasoning_confidence": 0.9,
        },
    ]
    m = calibration_step_metrics(infos)
    assert m["calib/parse_rate"] == pytest.approx(0.75)
    assert m["calib/accuracy"] == pytest.approx(0.5)
    assert m["calib/c_v_mean"] == pytest.approx(0.6)
    assert m["calib/c_r_mean"] == pytest.approx(2.0 / 3)
    assert m["calib/phi_mean"] == pytest.approx(0.6)
    # one sample per 10-wide bin (unparsed Φ counts as 0): ECE = (0.1 + 0.2 + 0 + 0.3) / 4
    assert m["calib/ece"] == pytest.approx(0.15)
    assert m["calib/auroc"] == pytest.approx(1.0)


def test_visual_term_goes_where_verl_puts_the_sample_reward():
    """verl's agent loop writes the reward on the jagged row's last position (rm_scores[-1]); with
    masked (tool) tokens ending a response that is not the last unmasked token."""
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])  # row 0: 5 tokens, the last two masked
    lengths = torch.tensor([5, 2])  # row 1 is padding after 2 tokens
    assert reward_positions(mask, lengths).tolist() == [4, 1]
    assert reward_positions(mask).tolist() == [2, 1]
    scores = torch.zeros(2, 5)
    scores[0, 4], scores[1, 1] = 1.0, 0.5
    kl = ent = torch.ones(2, 5)
    span = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    new, _, _ = visual_reward_step(
        scores, mask, [0.5, 0.5], kl, ent, span, w_vis=0.4, response_lengths=lengths
    )
    # both S equal → S̃ = 0.5 → visual term −0.4·(0.5−0.5)² = 0: rewards unchanged, nothing moved
    assert torch.equal(new, scores)
    new, _, _ = visual_reward_step(
        scores, mask, [1.0, 0.5], kl, ent, span, w_vis=0.4, response_lengths=lengths
    )
    assert new[0, 4] == pytest.approx(1.0 - 0.4 * 0.25) and new[0, 2] == 0.0
    assert new[1, 1] == pytest.approx(0.5)
