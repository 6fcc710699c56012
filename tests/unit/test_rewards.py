"""Reward arithmetic by hand (docs/design.md §3), the visual term, verl's compute_score, reference parity."""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vlcal_verl import rewards
from vlcal_verl.config import RewardConfig
from vlcal_verl.rewards import (
    REWARD_COMPONENT_KEYS,
    add_visual_term,
    compute_score,
    score_response,
    visual_reward,
)
from vlcal_verl.rewards_reference import normalise_tags, reference_components

RIGHT = SimpleNamespace(correct=True, status="ok")
WRONG = SimpleNamespace(correct=False, status="ok")
TIMEOUT = SimpleNamespace(correct=False, status="timeout")


def resp(v="8", r="6", box="\\boxed{2}", think_close="</think>") -> str:
    return (
        f"<think><vision>two dogs</vision><reasoning>so 2</reasoning>{think_close}\n{box}\n"
        "<analysis>clear</analysis>\n<confidence><vision_confidence>"
        f"{v}</vision_confidence><reasoning_confidence>{r}</reasoning_confidence></confidence>"
    )


NO_CONF = resp().split("<confidence>")[0]
PHI = 0.96 / 1.4  # Φ(0.8, 0.6) = 2·0.48/1.4 = 0.685714…

# (id, response, grade, config, expected score, expected brier, expected format)
HAND = [
    # I=1, F=1: brier −(0.685714−1)² = −0.098776; 1 + 2·(−0.098776) + 0.4 = 1.202449
    ("right-8-6", resp(), RIGHT, None, 1 - 2 * (1 - PHI) ** 2 + 0.4, -((1 - PHI) ** 2), 1.0),
    # I=0: brier −0.685714² = −0.470204; 0 − 0.940408 + 0.4 = −0.540408
    ("wrong-8-6", resp(), WRONG, None, -2 * PHI**2 + 0.4, -(PHI**2), 1.0),
    # Φ=1, I=1: brier 0; 1 + 0 + 0.4 = 1.4
    ("right-10-10", resp("10", "10"), RIGHT, None, 1.4, 0.0, 1.0),
    # Φ=1, I=0: brier −1; 0 − 2 + 0.4 = −1.6
    ("wrong-10-10", resp("10", "10"), WRONG, None, -1.6, -1.0, 1.0),
    # c_v=0 → Φ=0, I=0: brier 0; 0.4
    ("wrong-0-10", resp("0", "10"), WRONG, None, 0.4, 0.0, 1.0),
    # Φ=0, I=1: brier −1; 1 − 2 + 0.4 = −0.6
    ("right-0-10", resp("0", "10"), RIGHT, None, -0.6, -1.0, 1.0),
    # no confidence block: F=0, brier −1; 1 − 2 = −1
    ("right-unparsed", NO_CONF, RIGHT, None, -1.0, -1.0, 0.0),
    # 0 − 2 + 0 = −2
    ("wrong-unparsed", NO_CONF, WRONG, None, -2.0, -1.0, 0.0),
    # c_v = 11 out of range: unparsed → brier −1, F=0: 1 − 2 = −1
    ("right-out-of-range", resp("11", "6"), RIGHT, None, -1.0, -1.0, 0.0),
    # structure broken (no </think>) but confidences read: F=0, 1 − 2·0.098776 = 0.802449
    (
        "right-no-think-close",
        resp(think_close=""),
        RIGHT,
        None,
        1 - 2 * (1 - PHI) ** 2,
        -((1 - PHI) ** 2),
        0.0,
    ),
    # Φ(0.75, 0.25) = 2·0.1875/1.0 = 0.375; I=0: brier −0.140625; −0.28125 + 0.4 = 0.11875
    ("wrong-decimals", resp("7.5", "2.5"), WRONG, None, 0.11875, -0.140625, 1.0),
    # weights w_brier=1, w_fmt=0: 1 − 0.098776 = 0.901224
    (
        "custom-weights",
        resp(),
        RIGHT,
        RewardConfig(w_brier=1.0, w_fmt=0.0),
        1 - (1 - PHI) ** 2,
        -((1 - PHI) ** 2),
        1.0,
    ),
    # timeout is graded incorrect: Φ=1, I=0 → −1.6
    ("timeout", resp("10", "10"), TIMEOUT, None, -1.6, -1.0, 1.0),
    # RLCR: c=0.7, I=1: brier −0.09; 1 − 0.18 + 0.4 = 1.22
    (
        "rlcr-right",
        "<think>a</think>\\boxed{2}<analysis>b</analysis><confidence>7</confidence>",
        RIGHT,
        RewardConfig(protocol="rlcr", w_vis=0.0),
        1.22,
        -0.09,
        1.0,
    ),
    # RLCR unparsed (decoupled block is not a number), I=0: −2
    ("rlcr-unparsed", resp(), WRONG, RewardConfig(protocol="rlcr", w_vis=0.0), -2.0, -1.0, 0.0),
]


@pytest.mark.parametrize(
    ("response", "grade", "config", "score", "brier", "fmt"), [h[1:] for h in HAND], ids=[h[0] for h in HAND]
)
def test_hand_computed_rewards(response, grade, config, score, brier, fmt):
    out = score_response(response, "2", config=config, grade=grade)
    assert tuple(out) == REWARD_COMPONENT_KEYS
    assert out["score"] == pytest.approx(score, abs=1e-12)
    assert out["brier"] == pytest.approx(brier, abs=1e-12)
    assert out["format"] == fmt
    assert out["accuracy"] == float(grade.correct)
    assert out["grading_status"] == grade.status


def test_component_types_for_verl():
    ok = score_response(resp(), "2", grade=RIGHT)
    assert ok["vision_confidence"] == 0.8 and ok["reasoning_confidence"] == 0.6
    assert ok["confidence"] == pytest.approx(PHI) and ok["parse_ok"] is True
    bad = score_response(NO_CONF, "2", grade=WRONG)
    assert bad["confidence"] is None and bad["vision_confidence"] is None and bad["parse_ok"] is False
    assert all(isinstance(bad[k], float) for k in ("score", "accuracy", "format", "brier"))


def test_visual_reward_and_batch_term():
    import torch

    assert visual_reward(0.8, 0.3) == pytest.approx(-0.25)  # −(0.5)²
    assert visual_reward(0.3, 0.3) == 0.0
    assert visual_reward(None, 0.3) == -1.0
    assert visual_reward(0.3, None) == -1.0
    assert visual_reward(0.3, float("nan")) == -1.0
    scores = torch.tensor([1.0, 0.5, 0.0, 2.0])
    s_vis = torch.tensor([0.3, 0.5, float("nan"), 0.9])
    # [1 + 0.4·(−0.25), 0.5 + 0.4·(−1) (c_v None), 0 + 0.4·(−1) (no span), 2 + 0.4·(−0.01)]
    out = add_visual_term(scores, [0.8, None, 0.2, 1.0], s_vis, 0.4)
    assert out.tolist() == pytest.approx([0.9, 0.1, -0.4, 1.996])
    assert scores.tolist() == [1.0, 0.5, 0.0, 2.0]  # input untouched
    with pytest.raises(ValueError, match="batch size"):
        add_visual_term(scores, [0.1], s_vis, 0.4)


def test_compute_score_verl_signature(monkeypatch):
    seen = {}

    def fake_grade(answer, ground_truth, kind, timeout_s):
        seen.update(answer=answer, ground_truth=ground_truth, kind=kind, timeout_s=timeout_s)
        return RIGHT

    monkeypatch.setattr(rewards, "_grade", fake_grade)
    out = compute_score(
        "virl",
        resp("10", "10"),
        "2",
        {"answer_kind": "math", "num_turns": 2},
        w_fmt=0.5,
        grading_timeout_s=2.0,
        reward_router_address=None,
    )
    assert out["score"] == pytest.approx(1.5)  # 1 + 0 + 0.5
    assert seen == {"answer": "2", "ground_truth": "2", "kind": "math", "timeout_s": 2.0}
    compute_score("virl", resp(), 7, None)
    assert seen["ground_truth"] == "7" and seen["kind"] is None
    compute_score("virl", resp(), "7", {"answer_kind": "free_form"})  # unknown kind → auto
    assert seen["kind"] is None
    with pytest.raises(ValueError, match="w_brie"):
        compute_score("virl", resp(), "2", None, w_brie=1.0)


# ---------------------------------------------------------------- reference parity
PARITY = RewardConfig(reference_parity=True)


def oracle(response: str, accuracy: float) -> dict:
    """Independent oracle of the authors' rules, written as backtracking regexes (slow but literal)."""
    text = re.sub(r"\s*([<>/])\s*", r"\1", response)
    num = r"(\d+(?:\.\d+)?)"
    conf = re.search(
        "<confidence>.*?"
        + f"<vision_confidence>{num}</vision_confidence>.*?"
        + f"<reasoning_confidence>{num}</reasoning_confidence>.*?</confidence>",
        text,
        re.DOTALL,
    )
    phi = None
    if conf:
        v, r = float(conf.group(1)), float(conf.group(2))
        if 0 <= v <= 10 and 0 <= r <= 10:
            v, r = v / 10, r / 10
            phi = 0.0 if v == 0 or r == 0 else 2.0 / (1.0 / v + 1.0 / r)
    layout = [
        "<think>",
        "<vision>",
        "</vision>",
        "<reasoning>",
        "</reasoning>",
        "</think>",
        r"\\boxed\{",
        r"\}",
        "<analysis>",
        "</analysis>",
        "<confidence>",
        "<vision_confidence>(.*?)</vision_confidence>",
        "<reasoning_confidence>(.*?)</reasoning_confidence>",
        "</confidence>",
    ]
    m = re.search(".*?".join(layout), text, re.DOTALL)
    fmt = 0.0
    if m:
        try:
            a, b = float(m.group(1).strip()), float(m.group(2).strip())
            fmt = 1.0 if 0 <= a <= 10 and 0 <= b <= 10 else 0.0
        except ValueError:
            fmt = 0.0
    brier = -1.0 if phi is None else -((phi - accuracy) ** 2)
    return {"score": accuracy + 2.0 * brier + 0.4 * fmt, "format": fmt, "brier": brier, "confidence": phi}


def _box(ans: str) -> str:
    return resp(box=f"\\boxed{{{ans}}}")


PARITY_CASES = [
    # whitespace inside tags and inside the answer is removed before anything else: "1 / 2" → "1/2"
    (
        "spaces",
        resp()
        .replace("<think>", "< think >")
        .replace("</vision>", "< / vision >")
        .replace("\\boxed{2}", "\\boxed{1 / 2}"),
        "1/2",
        1.0,
        1.0,
        0.8,
        0.6,
    ),
    # Unicode digit: their \d accepts Arabic-Indic 8 and float() reads it → parsed and F=1
    ("arabic-digit", resp("٨", "6"), "2", 1.0, 1.0, 0.8, 0.6),
    # first vision_confidence is text: extraction skips to a later numeric one, format reads the first → F=0
    ("skip-invalid", resp("high</vision_confidence><vision_confidence>7", "5"), "2", 1.0, 0.0, 0.7, 0.5),
    # "1e1": not \d+(\.\d+)? → unparsed; but float("1e1") = 10 → F=1
    ("exponent", resp("1e1", "5"), "2", 1.0, 1.0, None, None),
    # "1_0": float() accepts digit separators → F=1; extraction fails → unparsed
    ("underscore", resp("1_0", "5"), "2", 1.0, 1.0, None, None),
    # out of range on the first numeric chain → unparsed, F=0
    ("out-of-range", resp("11", "5"), "2", 1.0, 0.0, None, None),
    # "nan": F=0 (nan comparisons are False), unparsed
    ("nan", resp("nan", "5"), "2", 1.0, 0.0, None, None),
    # "7 / 10" becomes "7/10" → not a number anywhere
    ("fraction", resp("7 / 10", "5"), "2", 1.0, 0.0, None, None),
    # no box: mathruler extracts "None" → wrong; F=0
    ("no-box", resp(box="2"), "2", 0.0, 0.0, 0.8, 0.6),
    # multiple choice letter graded by mathruler
    ("letter", _box("B"), "B", 1.0, 1.0, 0.8, 0.6),
]


@pytest.mark.parametrize(
    ("response", "gt", "acc", "fmt", "c_v", "c_r"),
    [c[1:] for c in PARITY_CASES],
    ids=[c[0] for c in PARITY_CASES],
)
def test_reference_parity_cases(response, gt, acc, fmt, c_v, c_r):
    out = score_response(response, gt, config=PARITY)
    assert tuple(out) == REWARD_COMPONENT_KEYS
    assert (out["accuracy"], out["format"]) == (acc, fmt)
    assert out["vision_confidence"] == (None if c_v is None else pytest.approx(c_v))
    assert out["reasoning_confidence"] == (None if c_r is None else pytest.approx(c_r))
    if c_v is None:
        assert out["brier"] == -1.0 and out["confidence"] is None
    else:  # their float expression, exactly
        phi = 0.0 if c_v == 0 or c_r == 0 else 2.0 / (1.0 / (c_v) + 1.0 / (c_r))
        assert out["confidence"] == pytest.approx(phi, abs=0)
        assert out["brier"] == -((phi - acc) ** 2)
    assert out["score"] == acc + 2.0 * out["brier"] + 0.4 * fmt
    expected = oracle(response, acc)
    assert out["score"] == expected["score"] and out["format"] == expected["format"]


def test_reference_parity_hand_arithmetic():
    # skip-invalid case: Φ = 2/(1/0.7 + 1/0.5) = 2/3.428571 = 0.583333; I=1: brier −0.173611;
    # F=0 → score 1 − 0.347222 = 0.652778
    out = score_response(resp("high</vision_confidence><vision_confidence>7", "5"), "2", config=PARITY)
    assert out["score"] == pytest.approx(1 - 2 * (1 - 2 / (1 / 0.7 + 1 / 0.5)) ** 2)
    assert out["score"] == pytest.approx(0.652778, abs=1e-6)
    # exponent case: unparsed (brier −1) yet F=1: 1 − 2 + 0.4 = −0.6
    assert score_response(resp("1e1", "5"), "2", config=PARITY)["score"] == pytest.approx(-0.6)


def test_reference_parity_uses_given_grade():
    out = score_response(resp("10", "10"), "nonsense", config=PARITY, grade=TIMEOUT)
    assert (
        out["accuracy"] == 0.0 and out["grading_status"] == "timeout" and out["score"] == pytest.approx(-1.6)
    )


RLCR_AUTHORS = RewardConfig(reference_parity=True, protocol="rlcr", w_brier=0.8, w_fmt=0.4, w_vis=0.0)


def rlcr(conf: str = "8", answer: str = "4", tail: str = "") -> str:
    return (
        f"<think> look </think> so \\boxed{{{answer}}} <analysis> fine </analysis>"
        f"<confidence> {conf} </confidence>{tail}"
    )


@pytest.mark.parametrize(
    ("response", "gt", "c", "fmt", "parse_ok"),
    [
        # wrong at 8: c = 0.8^1.3 = 0.748199; F = 1 (8 in [1, 10])
        (rlcr("8"), "5", 0.8**1.3, 1.0, True),
        # right at 10: c = 1; F = 1
        (rlcr("10"), "4", 1.0, 1.0, True),
        # c = 0 parses (c = 0) but is outside [1, 10]: F = 0.5
        (rlcr("0"), "4", 0.0, 0.5, True),
        # 12 → (1.2)^1.3 capped at 1; F = 0.5
        (rlcr("12"), "4", 1.0, 0.5, True),
        # trailing text after </confidence>: the whole-layout match fails, F = 0; c still read
        (rlcr("8", tail=" thanks"), "4", 0.8**1.3, 0.0, True),
        # no confidence number: c = 0.5 (not a penalty); "high" is no float: F = 0
        (rlcr("high"), "4", 0.5, 0.0, False),
        # 1e1 is a float in [1, 10] (F = 1) but not a <confidence>NUMBER</confidence>: c = 0.5
        (rlcr("1e1"), "4", 0.5, 1.0, False),
    ],
)
def test_rlcr_authors_form_hand_computed(response, gt, c, fmt, parse_ok):
    out = score_response(response, gt, config=RLCR_AUTHORS)
    i_correct = 1.0 if gt == "4" else 0.0
    assert out["accuracy"] == i_correct and out["parse_ok"] is parse_ok
    assert out["confidence"] == pytest.approx(c) and out["format"] == fmt
    assert out["score"] == pytest.approx(i_correct - 0.8 * (c - i_correct) ** 2 + 0.4 * fmt)


def test_rlcr_authors_wrong_answer_at_8_is_minus_0_048():
    # 0 + 0.8·(−0.748199²) + 0.4 = −0.0478...; the project's own RLCR (w 2.0, c/10): 0 − 2·0.64 + 0.4 = −0.88
    assert score_response(rlcr("8"), "5", config=RLCR_AUTHORS)["score"] == pytest.approx(-0.04784, abs=1e-5)
    own = RewardConfig(protocol="rlcr", w_vis=0.0)
    assert score_response(rlcr("8"), "5", config=own)["score"] == pytest.approx(-0.88)


PIECES = [
    "<think>",
    "</think>",
    "<vision>",
    "</vision>",
    "<reasoning>",
    "</reasoning>",
    "\\boxed{",
    "}",
    "<analysis>",
    "</analysis>",
    "<confidence>",
    "</confidence>",
    "<vision_confidence>",
    "</vision_confidence>",
    "<reasoning_confidence>",
    "</reasoning_confidence>",
    " / ",
    " < ",
    "> ",
    "7",
    "10",
    "3.5",
    "11",
    "x",
    "٣",
    "1e1",
    "nan",
    " ",
]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=30), st.sampled_from([0.0, 1.0]))
def test_reference_parity_matches_regex_oracle(pieces, accuracy):
    text = "".join(pieces)
    parts = reference_components(text, "2", accuracy=accuracy)
    expected = oracle(text, accuracy)
    assert parts["format"] == expected["format"]
    assert parts["brier"] == expected["brier"]
    assert parts["confidence"] == expected["confidence"]
    assert not math.isnan(parts["accuracy"])


def test_normalise_tags():
    assert normalise_tags("a < / b >  c / d") == "a</b>c/d"


def test_compute_score_with_real_grader():
    out = compute_score("virl", resp(box="\\boxed{\\frac{1}{2}}"), "0.5", {"answer_kind": "math"})
    assert out["accuracy"] == 1.0 and out["grading_status"] == "ok"
    out = compute_score("virl", resp(box="\\boxed{(B) 12}"), "B", None)
    assert out["accuracy"] == 1.0
    out = compute_score("virl", resp(box="\\boxed{3}"), "4", None)
    assert out["accuracy"] == 0.0 and out["grading_status"] == "ok"
    out = compute_score("virl", resp(box="no box"), "4", None)
    assert out["grading_status"] == "no_answer"
    # sympy hangs on this; the pool kills the worker: graded incorrect with status "timeout"
    out = compute_score(
        "virl", resp("10", "10", box="\\boxed{9**9**9**9}"), "\\sqrt{2}", None, grading_timeout_s=1.0
    )
    assert out["grading_status"] == "timeout" and out["accuracy"] == 0.0
    assert out["score"] == pytest.approx(-1.6)  # Φ=1, I=0: 0 − 2 + 0.4
