"""The warm start's two layouts: decoupled targets (the default, unchanged) and, opt-in, a share of RLCR
targets under RLCR's prompt, so the science run's RLCR baseline starts from the same model."""

from __future__ import annotations

import random

import pytest

from vlcal_verl.data.easy_vqa import load_easy_vqa
from vlcal_verl.demo.config import DemoConfig
from vlcal_verl.demo.data import image_facts, rlcr_target, warm_start_target
from vlcal_verl.demo.warm_start import build_targets, is_rlcr
from vlcal_verl.protocol import parse_response


@pytest.fixture(scope="module")
def items():
    return load_easy_vqa("train", limit=40, seed=5)


def test_rlcr_targets_parse_under_rlcr_with_the_description_first():
    rng = random.Random(1)
    seen = set()
    for item in load_easy_vqa("train", limit=40, seed=2):
        facts = image_facts(item.image)
        text = rlcr_target(item.question, item.answer, facts, rng)
        parsed = parse_response(text, "rlcr")
        assert parsed.format_ok and parsed.parse_ok, parsed.failure
        assert parsed.answer == item.answer
        assert 0.2 <= parsed.confidence <= 0.9  # CONFIDENCE_RANGE (2..9) / 10
        seen.add(parsed.confidence)
        # z_vis is the first sentence of <think>, as the decoupled target's <vision> says it
        assert text.startswith(f"<think>{facts.describe()} ")
        # not the decoupled layout: no vision/reasoning confidences to read
        assert not parse_response(text, "decoupled").parse_ok
    assert len(seen) > 4  # spread out, uninformative


def test_default_targets_are_the_decoupled_ones_of_before(items):
    """fraction 0: every target is warm_start_target with the per-item RNG (the same draws as before)."""
    pairs = build_targets(items, seed=7)
    for i, (item, text, protocol) in enumerate(pairs):
        rng = random.Random(f"7:{i}:{item.uid}")
        assert protocol == "decoupled"
        assert text == warm_start_target(item.question, item.answer, image_facts(item.image), rng)


@pytest.mark.parametrize(("fraction", "expected"), [(0.5, 20), (0.25, 10), (0.3, 12)])
def test_rlcr_fraction_gives_floor_n_f_rlcr_targets_spread_out(items, fraction, expected):
    pairs = build_targets(items, seed=0, rlcr_fraction=fraction)
    flags = [p == "rlcr" for _, _, p in pairs]
    assert sum(flags) == expected  # floor(40 * f)
    assert sum(flags[:20]) == int(20 * fraction)  # evenly spread: the first half holds its share
    for (item, text, protocol), flag in zip(pairs, flags, strict=True):
        parsed = parse_response(text, protocol)
        assert parsed.format_ok and parsed.answer == item.answer
        assert (parsed.vision is None) == flag  # RLCR has no <vision> block
    assert [is_rlcr(i, 0.5) for i in range(4)] == [False, True, False, True]


def test_warm_start_prompts_each_target_in_its_protocol(items, monkeypatch):
    """One supervised step sees RLCR's instructions exactly for the RLCR targets."""
    import vlcal_verl.demo.warm_start as ws
    from vlcal_verl.demo.data import user_message
    from vlcal_verl.testing.tiny_models import load_tiny_vlm

    seen = []
    real = ws.encode_prompts

    def recording(processor, messages, images):
        seen.extend(messages)
        return real(processor, messages, images)

    monkeypatch.setattr(ws, "encode_prompts", recording)
    model, processor = load_tiny_vlm("qwen3-vl", tokenizer="small")
    batch = items[:8]
    losses = ws.warm_start(
        model, processor, batch, steps=1, batch_size=8, lr=1e-3, weight_decay=0.0, grad_clip=1.0, seed=0,
        rlcr_fraction=0.5,
    )  # fmt: skip
    assert len(losses) == 1
    order = random.Random(0).sample(range(8), 8)  # the warm start's seeded batch order
    expected = [user_message(batch[i].question, "rlcr" if is_rlcr(i, 0.5) else "decoupled") for i in order]
    assert seen == expected
    assert sum("<confidence>N</confidence>" in m[0]["content"][-1]["text"] for m in seen) == 4


def test_rlcr_fraction_is_validated():
    assert DemoConfig().warm_start_rlcr_fraction == 0.0  # opt-in: the demo and loop tests are unchanged
    assert DemoConfig.from_dict({"warm_start_rlcr_fraction": "0.5"}).warm_start_rlcr_fraction == 0.5
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match=r"demo\.warm_start_rlcr_fraction must be in \[0, 1\)"):
            DemoConfig.from_dict({"warm_start_rlcr_fraction": bad})
