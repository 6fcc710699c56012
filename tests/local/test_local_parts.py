"""Fast checks of the local engine's parts: recipe loading, warm-start targets, sampler, response cutting."""

from __future__ import annotations

import random

import pytest
import torch

from vlcal_verl.local.config import load_train_config
from vlcal_verl.local.data import PALETTE, image_facts, warm_start_target
from vlcal_verl.local.engine import data_order
from vlcal_verl.local.rollout import TopKSampler, cut_responses


def test_recipe_loads_and_overrides_are_typed():
    cfg = load_train_config(
        "recipes/tiny_cpu.yaml", ["local.lr=1e-3", "local.rl_steps=3", "vlcal.tar.enabled=false"]
    )
    assert cfg.engine == "local"
    assert cfg.local.lr == 0.001 and isinstance(cfg.local.lr, float)
    assert cfg.local.rl_steps == 3 and cfg.vlcal.tar.enabled is False
    assert cfg.local.rl_steps >= 0 and cfg.local.n_rollouts >= 2


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("local.bogus=1", "bogus"),
        ("local.lr=abc", "local.lr"),
        ("local.n_rollouts=1", "n_rollouts"),
        ("engine=verl", "engine"),
    ],
)
def test_bad_recipe_values_name_the_field(override, field):
    with pytest.raises(ValueError, match=field):
        load_train_config(None, [override])


def test_image_facts_match_easy_vqa_answers():
    from vlcal_verl.data.easy_vqa import load_easy_vqa

    checked = 0
    for item in load_easy_vqa("test", limit=300, seed=1):
        facts = image_facts(item.image)
        if item.question.startswith(("what color", "what is the color")):
            assert facts.color == item.answer, item.question
            checked += 1
        if item.answer in ("circle", "rectangle", "triangle"):
            assert facts.shape == item.answer, item.question
            checked += 1
    assert checked > 20


def test_blank_image_has_no_shape():
    from PIL import Image

    assert image_facts(Image.new("RGB", (64, 64), (255, 255, 255))).describe() == "The image shows no shape."


def test_warm_start_targets_are_well_formed_protocol():
    from vlcal_verl.data.easy_vqa import load_easy_vqa
    from vlcal_verl.protocol import parse_response

    rng = random.Random(0)
    confidences = set()
    for item in load_easy_vqa("train", limit=60, seed=2):
        facts = image_facts(item.image)
        parsed = parse_response(warm_start_target(item.question, item.answer, facts, rng))
        assert parsed.format_ok and parsed.parse_ok, parsed.failure
        assert parsed.answer == item.answer
        assert parsed.vision.startswith("The image shows a") and (facts.color or "") in parsed.vision
        confidences.add((parsed.vision_confidence, parsed.reasoning_confidence))
    assert len(confidences) > 10, "confidence targets must be spread out, not one fixed value"
    assert all(0.2 <= c <= 0.9 for pair in confidences for c in pair)
    assert len(PALETTE) == 8


def test_sampler_respects_top_k_suppression_and_seed():
    scores = torch.zeros(3, 10)
    scores[:, 7] = 100.0  # suppressed: must never be drawn
    scores[:, 2] = 5.0
    scores[:, 3] = 4.9
    draw = lambda seed: TopKSampler(1.0, 2, torch.Generator().manual_seed(seed), [7])(None, scores)  # noqa: E731
    out = draw(0)
    chosen = out.argmax(-1)
    assert torch.all((chosen == 2) | (chosen == 3))
    assert torch.isinf(out).sum() == 3 * 9 and (out == 0).sum() == 3
    assert torch.equal(draw(0), out)
    greedy = TopKSampler(0.0, 2, None, [7])(None, scores)
    assert torch.all(greedy.argmax(-1) == 2)


def test_sampler_top_p_keeps_the_nucleus_only():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.8 keeps the first two (the third starts at 0.8)
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    scores = probs.log().repeat(4000, 1)
    for top_k in (0, 3):  # full-vocabulary sort, and within the top-k
        out = TopKSampler(1.0, top_k, torch.Generator().manual_seed(1), [], top_p=0.8)(None, scores)
        counts = torch.bincount(out.argmax(-1), minlength=4)
        assert counts[0] == 0 and counts[2] == 0
        assert abs(counts[1] / 4000 - 0.5 / 0.8) < 0.03  # renormalised over the nucleus: 0.625 / 0.375
    top1 = TopKSampler(1.0, 0, torch.Generator().manual_seed(0), [], top_p=0.3)(None, scores)
    assert torch.all(top1.argmax(-1) == 1)  # the most likely token alone already reaches 0.3
    full = TopKSampler(1.0, 0, torch.Generator().manual_seed(2), [], top_p=1.0)(None, scores)
    assert (torch.bincount(full.argmax(-1), minlength=4) > 0).all()  # top_p 1: every token can come
    with pytest.raises(ValueError, match="top_p"):
        TopKSampler(1.0, 0, None, [], top_p=0.0)


def test_cut_responses_keeps_tokens_through_first_eos():
    eos, pad = 9, 0
    gen = torch.tensor([[5, 6, 9, 4, 4], [5, 9, 9, 9, 9], [1, 2, 3, 4, 5]])
    responses, mask = cut_responses(gen, eos, pad)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert responses.tolist() == [[5, 6, 9, 0, 0], [5, 9, 0, 0, 0], [1, 2, 3, 4, 5]]


def test_data_order_is_a_pure_function_of_step_and_covers_an_epoch():
    per_step, n = 4, 12
    first_epoch = [i for step in range(1, 4) for i in data_order(n, 0, step, per_step)]
    assert sorted(first_epoch) == list(range(n))
    assert data_order(n, 0, 5, per_step) == data_order(n, 0, 5, per_step)
    assert data_order(n, 0, 5, per_step) != data_order(n, 1, 5, per_step)


def test_summary_row_reads_vlcal_eval_report(tmp_path):
    from vlcal_verl.evaluation.report import write_report
    from vlcal_verl.local.evaluate import format_table, summary_row

    def rec(conf, correct, blank=False):
        parsed = conf is not None
        return {
            "benchmark": "easy_vqa",
            "confidence": conf,
            "correct": correct,
            "parse_ok": parsed,
            "vision_confidence": conf,
            "reasoning_confidence": conf,
            "unanswerable": blank,
        }

    records = [
        rec(0.8, True),
        rec(0.4, False),
        rec(None, False),
        rec(0.6, True),
        rec(0.5, False, True),
        rec(0.3, False, True),
    ]
    row = summary_row(write_report(records, tmp_path, title="t"))
    assert row["accuracy"] == pytest.approx(0.5)  # 2 of 4 answerable; unparsed counts as wrong
    assert row["parse_rate"] == pytest.approx(0.75)
    assert row["unanswerable_gap"] == pytest.approx((0.8 + 0.4 + 0.0 + 0.6) / 4 - 0.4)  # unparsed Φ = 0
    assert 0.0 <= row["ece"] <= 1.0
    table = format_table({"before": row, "after": row})
    assert "| parse rate | 0.750 | 0.750 |" in table and table.count("\n") == 9
