"""The authors' sampled-token signals and the perception filter's mask, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from vlcal_verl.config import TARConfig, VCEConfig
from vlcal_verl.token_signals import (
    k3_clamped,
    perception_mask,
    sampled_kl,
    tar_token_signals,
    vce_token_signals,
)


def test_k3_clamped_both_clamps():
    old = torch.tensor([0.0, 0.0, -1.0, 0.0, -30.0], dtype=torch.float64)
    masked = torch.tensor([-1.0, 1.0, -1.0, -25.0, 0.0], dtype=torch.float64)
    got = k3_clamped(old, masked).tolist()
    assert got[0] == pytest.approx(math.exp(-1) + 1 - 1)  # d = −1: e^-1 − (−1) − 1
    assert got[1] == pytest.approx(math.e - 1 - 1)  # d = +1
    assert got[2] == 0.0  # same log-prob
    # d = −25 clamps to −20: e^-20 + 20 − 1 = 19.000000002 → clamped to 10
    assert got[3] == 10.0
    # d = +30 clamps to +20: e^20 − 21 → clamped to 10
    assert got[4] == 10.0


def test_sampled_estimators():
    old, masked = torch.tensor([-0.5]), torch.tensor([-1.5])
    # k3: d = −1 → e^-1 + 1 − 1 (no clamps)
    assert float(sampled_kl(old, masked, "k3")) == pytest.approx(math.exp(-1))
    # reference: p_old · (log p_old − log p_masked) = e^-0.5 · 1
    assert float(sampled_kl(old, masked, "reference")) == pytest.approx(math.exp(-0.5))
    # reference is clamped to [0, 10]: a masked prob higher than the original gives a negative term → 0
    assert float(sampled_kl(torch.tensor([-0.1]), torch.tensor([-0.01]), "reference")) == 0.0
    with pytest.raises(ValueError, match="estimator"):
        sampled_kl(old, masked, "exact")


def test_signal_selection():
    old = torch.tensor([[-0.5, -2.0]])
    masked = torch.tensor([[-1.5, -2.0]])
    exact, ent = torch.tensor([[0.3, 0.4]]), torch.tensor([[1.1, 1.2]])
    kw = {"old_logp": old, "masked_logp": masked, "exact_kl": exact, "entropy": ent}
    kl, h = vce_token_signals(VCEConfig(), **kw)
    assert kl is exact and h is ent
    kl, h = vce_token_signals(VCEConfig(estimator="reference", entropy="nll"), **kw)
    assert h.tolist() == [[0.5, 2.0]] and kl[0, 1] == 0.0
    kl, h = tar_token_signals(TARConfig(kl="k3_clamped", entropy="nll"), VCEConfig(), **kw)
    assert kl[0, 0].item() == pytest.approx(math.exp(-1)) and h.tolist() == [[0.5, 2.0]]
    kl, h = tar_token_signals(TARConfig(), VCEConfig(), **kw)
    assert kl is exact and h is ent
    with pytest.raises(ValueError, match="entropy"):
        vce_token_signals(VCEConfig(), old_logp=old, masked_logp=masked, exact_kl=exact, entropy=None)


@pytest.mark.parametrize(
    ("n", "k"),
    [(1, 1), (4, 1), (5, 1), (6, 2), (10, 2), (11, 3), (96, 20), (100, 20)],  # ⌈0.2·n⌉
)
def test_perception_keeps_ceil_of_a_fifth(n, k):
    scores = torch.arange(n, dtype=torch.float32).flip(0).unsqueeze(0)  # largest first
    mask = perception_mask(scores, torch.ones(1, n), 0.2)
    assert mask.sum().item() == k and mask[0, :k].all()


def test_perception_ties_padding_and_rows():
    scores = torch.tensor([[0.5, 0.5, 0.5, 0.5, 9.0, 9.0], [1.0, 3.0, 2.0, 0.0, 0.0, 0.0]])
    valid = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    mask = perception_mask(scores, valid, 0.5)
    # row 0: k = 3 → both 9s, then the first of the tied 0.5s; row 1: n = 3 → k = 2 → 3.0 and 2.0
    assert mask.int().tolist() == [[1, 0, 0, 0, 1, 1], [0, 1, 1, 0, 0, 0]]
    # padding is never kept, even with the largest score; an empty row keeps nothing
    scores = torch.tensor([[0.0, 100.0], [5.0, 5.0]])
    mask = perception_mask(scores, torch.tensor([[1, 0], [0, 0]]), 0.2)
    assert mask.int().tolist() == [[1, 0], [0, 0]]
    with pytest.raises(ValueError, match="top_fraction"):
        perception_mask(scores, torch.ones(2, 2), 0.0)
