"""parse_response / vision_char_span / build_prompt on hand-written responses, plus a property test."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlcal_verl.protocol import (
    ParsedResponse,
    build_prompt,
    extract_answer,
    overall_confidence,
    parse_response,
    vision_char_span,
)

GOOD = (
    "<think><vision>Two red dogs on grass.</vision><reasoning>Count them: 2.</reasoning></think>\n"
    "\\boxed{2}\n"
    "<analysis>The image is clear.</analysis>\n"
    "<confidence><vision_confidence>8</vision_confidence>"
    "<reasoning_confidence>6</reasoning_confidence></confidence>"
)
RLCR_GOOD = "<think>count: 2</think>\n\\boxed{2}\n<analysis>clear</analysis>\n<confidence>7</confidence>"


def conf(v: str, r: str) -> str:
    return GOOD.replace(">8<", f">{v}<").replace(">6<", f">{r}<")


PHI_86 = 2 * 0.8 * 0.6 / 1.4  # harmonic mean of 0.8 and 0.6 = 0.96/1.4

# (id, text, format_ok, parse_ok, c_v, c_r, answer, failure substring or None)
CASES = [
    ("well-formed", GOOD, True, True, 0.8, 0.6, "2", None),
    ("text-before-after", "Sure!\n" + GOOD + "\nThanks.", True, True, 0.8, 0.6, "2", None),
    (
        "spaces-in-tags",
        GOOD.replace("<vision>", "< vision >").replace("</vision>", "< / vision >"),
        True,
        True,
        0.8,
        0.6,
        "2",
        None,
    ),
    ("newlines-in-tags", GOOD.replace("</think>", "<\n/\nthink\n>"), True, True, 0.8, 0.6, "2", None),
    (
        "tabs-in-conf-tags",
        GOOD.replace("<vision_confidence>", "<\tvision_confidence\t>"),
        True,
        True,
        0.8,
        0.6,
        "2",
        None,
    ),
    ("spaces-around-values", conf(" 8 ", "\n6\n"), True, True, 0.8, 0.6, "2", None),
    ("decimal-values", conf("7.5", "2.25"), True, True, 0.75, 0.225, "2", None),
    ("trailing-dot", conf("7.", "6"), True, True, 0.7, 0.6, "2", None),
    ("leading-dot", conf(".5", "6"), True, True, 0.05, 0.6, "2", None),
    ("plus-sign", conf("+8", "6"), True, True, 0.8, 0.6, "2", None),
    ("zero-vision", conf("0", "6"), True, True, 0.0, 0.6, "2", None),
    ("both-ten", conf("10", "10"), True, True, 1.0, 1.0, "2", None),
    ("both-zero", conf("0", "0"), True, True, 0.0, 0.0, "2", None),
    ("leading-zeros", conf("08", "006"), True, True, 0.8, 0.6, "2", None),
    ("out-of-range-high", conf("11", "6"), False, False, None, 0.6, "2", "vision_confidence out of range"),
    ("out-of-range-neg", conf("8", "-1"), False, False, 0.8, None, "2", "reasoning_confidence out of range"),
    ("ten-point-one", conf("10.1", "6"), False, False, None, 0.6, "2", "out of range"),
    ("huge-number", conf("9" * 400, "6"), False, False, None, 0.6, "2", "out of range"),
    ("non-numeric", conf("high", "6"), False, False, None, 0.6, "2", "vision_confidence is not a number"),
    ("nan-string", conf("nan", "6"), False, False, None, 0.6, "2", "not a number"),
    ("inf-string", conf("8", "inf"), False, False, 0.8, None, "2", "not a number"),
    ("exponent", conf("1e1", "6"), False, False, None, 0.6, "2", "not a number"),
    ("fraction", conf("7/10", "6"), False, False, None, 0.6, "2", "not a number"),
    ("percent", conf("80%", "6"), False, False, None, 0.6, "2", "not a number"),
    ("empty-value", conf("", "6"), False, False, None, 0.6, "2", "not a number"),
    ("fullwidth-digit", conf("８", "6"), False, False, None, 0.6, "2", "not a number"),
    ("arabic-indic-digit", conf("٨", "6"), False, False, None, 0.6, "2", "not a number"),
    ("missing-think-open", GOOD.replace("<think>", ""), False, True, 0.8, 0.6, "2", "missing <think>"),
    ("missing-think-close", GOOD.replace("</think>", ""), False, True, 0.8, 0.6, "2", "missing </think>"),
    (
        "missing-vision",
        GOOD.replace("<vision>", "").replace("</vision>", ""),
        False,
        True,
        0.8,
        0.6,
        "2",
        "missing <vision>",
    ),
    ("missing-vision-close", GOOD.replace("</vision>", ""), False, True, 0.8, 0.6, "2", "missing </vision>"),
    ("missing-reasoning", GOOD.replace("<reasoning>", ""), False, True, 0.8, 0.6, "2", "missing <reasoning>"),
    ("missing-box", GOOD.replace("\\boxed{2}", "2"), False, True, 0.8, 0.6, None, "missing \\boxed{}"),
    ("unbalanced-box", GOOD.replace("\\boxed{2}", "\\boxed{2"), False, True, 0.8, 0.6, None, "boxed"),
    (
        "box-before-think-close",
        GOOD.replace("</think>\n\\boxed{2}", "\\boxed{2}</think>"),
        False,
        True,
        0.8,
        0.6,
        "2",
        "missing \\boxed{}",
    ),
    (
        "missing-analysis",
        GOOD.replace("<analysis>The image is clear.</analysis>", ""),
        False,
        True,
        0.8,
        0.6,
        "2",
        "missing <analysis>",
    ),
    (
        "missing-analysis-close",
        GOOD.replace("</analysis>", ""),
        False,
        True,
        0.8,
        0.6,
        "2",
        "missing </analysis>",
    ),
    (
        "missing-confidence-block",
        GOOD.split("<confidence>")[0],
        False,
        False,
        None,
        None,
        "2",
        "missing <confidence>",
    ),
    (
        "missing-confidence-close",
        GOOD.replace("</confidence>", ""),
        False,
        False,
        None,
        None,
        "2",
        "missing </confidence>",
    ),
    (
        "missing-reasoning-conf",
        GOOD.replace("<reasoning_confidence>6</reasoning_confidence>", ""),
        False,
        False,
        0.8,
        None,
        "2",
        "missing <reasoning_confidence>",
    ),
    (
        "missing-vision-conf-close",
        GOOD.replace("</vision_confidence>", ""),
        False,
        False,
        None,
        0.6,
        "2",
        "missing </vision_confidence>",
    ),
    (
        "swapped-conf-order",
        GOOD.replace(
            "<vision_confidence>8</vision_confidence><reasoning_confidence>6</reasoning_confidence>",
            "<reasoning_confidence>6</reasoning_confidence><vision_confidence>8</vision_confidence>",
        ),
        False,
        False,
        0.8,
        None,
        "2",
        "missing <reasoning_confidence>",
    ),
    (
        "confidence-before-analysis",
        "<think><vision>a</vision><reasoning>b</reasoning></think>\\boxed{1}"
        "<confidence><vision_confidence>5</vision_confidence><reasoning_confidence>5</reasoning_confidence>"
        "</confidence><analysis>c</analysis>",
        False,
        True,
        0.5,
        0.5,
        "1",
        "does not follow </analysis>",
    ),
    ("cut-off-in-vision", GOOD[:30], False, False, None, None, None, "missing </vision>"),
    ("empty-string", "", False, False, None, None, None, "missing <think>"),
    ("plain-answer", "The answer is 2.", False, False, None, None, None, "missing <think>"),
    ("uppercase-tags", GOOD.replace("think>", "THINK>"), False, True, 0.8, 0.6, "2", "missing <think>"),
    (
        "nested-box",
        GOOD.replace("\\boxed{2}", "\\boxed{\\frac{1}{2}}"),
        True,
        True,
        0.8,
        0.6,
        "\\frac{1}{2}",
        None,
    ),
    (
        "last-box-wins",
        GOOD.replace("\\boxed{2}", "\\boxed{1} or rather \\boxed{2}"),
        True,
        True,
        0.8,
        0.6,
        "2",
        None,
    ),
    ("fbox", GOOD.replace("\\boxed{2}", "\\fbox{B}"), True, True, 0.8, 0.6, "B", None),
    (
        "duplicate-conf-blocks",
        GOOD + "<confidence><vision_confidence>1</vision_confidence>"
        "<reasoning_confidence>1</reasoning_confidence></confidence>",
        True,
        True,
        0.8,
        0.6,
        "2",
        None,
    ),
    (
        "nested-vision-tags",
        GOOD.replace("<vision>Two", "<vision><vision>Two"),
        True,
        True,
        0.8,
        0.6,
        "2",
        None,
    ),
    (
        "unicode-content",
        GOOD.replace("Two red dogs on grass.", "两只红狗 🐕🐕 на траве"),
        True,
        True,
        0.8,
        0.6,
        "2",
        None,
    ),
    ("last-box-cut-off", GOOD + "\\boxed{3", False, True, 0.8, 0.6, None, "cut off"),
    ("zero-width-space-value", conf("8\u200b", "6"), False, False, None, 0.6, "2", "not a number"),
    ("tag-lookalike", GOOD.replace("<vision>", "<visionary>"), False, True, 0.8, 0.6, "2", "missing"),
]


@pytest.mark.parametrize(
    ("text", "format_ok", "parse_ok", "c_v", "c_r", "answer", "failure"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_hand_written_cases(text, format_ok, parse_ok, c_v, c_r, answer, failure):
    p = parse_response(text)
    assert p.format_ok is format_ok
    assert p.parse_ok is parse_ok
    assert p.vision_confidence == (None if c_v is None else pytest.approx(c_v))
    assert p.reasoning_confidence == (None if c_r is None else pytest.approx(c_r))
    assert p.answer == answer
    if failure is None:
        assert p.failure is None
    else:
        assert p.failure is not None and failure in p.failure
    if parse_ok:
        expected_phi = 0.0 if c_v == 0 or c_r == 0 else 2 * c_v * c_r / (c_v + c_r)
        assert p.confidence == pytest.approx(expected_phi)
    else:
        assert p.confidence is None


def test_case_count_meets_acceptance():
    assert len(CASES) >= 40


def test_fields_of_good_response():
    p = parse_response(GOOD)
    assert p.vision == "Two red dogs on grass."
    assert p.reasoning == "Count them: 2."
    assert p.analysis == "The image is clear."
    assert p.confidence == pytest.approx(PHI_86)  # 0.96 / 1.4 = 0.685714...
    assert p.protocol == "decoupled"


def test_rlcr_cases():
    p = parse_response(RLCR_GOOD, "rlcr")
    assert (p.format_ok, p.parse_ok, p.confidence, p.answer) == (True, True, 0.7, "2")
    assert p.vision_confidence is None and p.reasoning_confidence is None and p.vision is None
    p = parse_response(RLCR_GOOD.replace(">7<", ">12<"), "rlcr")
    assert (p.format_ok, p.parse_ok, p.confidence) == (False, False, None)
    assert "out of range" in p.failure
    p = parse_response(RLCR_GOOD.replace("</think>", ""), "rlcr")
    assert (p.format_ok, p.parse_ok, p.confidence) == (False, True, 0.7)
    # a decoupled response read under RLCR: the confidence block holds tags, not a number
    p = parse_response(GOOD, "rlcr")
    assert not p.parse_ok and "not a number" in p.failure


def test_non_string_and_unknown_protocol_never_raise():
    for bad in (None, 3, b"<think>", ["x"]):
        p = parse_response(bad)  # type: ignore[arg-type]
        assert not p.format_ok and not p.parse_ok and "not a str" in p.failure
    p = parse_response(GOOD, "nope")
    assert not p.format_ok and p.failure == "unknown protocol"


def test_overall_confidence_hand_values():
    assert overall_confidence(0.8, 0.6) == pytest.approx(0.96 / 1.4)
    assert overall_confidence(1.0, 1.0) == 1.0
    assert overall_confidence(0.5, 0.0) == 0.0
    assert overall_confidence(0.2, 0.8) == pytest.approx(0.32 / 1.0)  # 2·0.16/1.0


def test_vision_char_span():
    text = "xx< vision >ab c<\t/vision>yy"
    assert vision_char_span(text) == (12, 16)
    assert text[12:16] == "ab c"
    assert vision_char_span("<vision>never closed") is None
    assert vision_char_span("</vision><vision>") is None
    assert vision_char_span("<vision></vision>") == (8, 8)
    # first <vision>, first </vision> after it
    assert vision_char_span("<vision>a<vision>b</vision>c</vision>") == (8, 18)


def test_extract_answer_agrees_with_grading():
    from vlcal_verl.grading import extract_boxed

    for text in (
        "\\boxed{a} \\boxed{b{c}}",
        "\\boxed{ 12 }",
        "no box",
        "\\boxed{a} then \\boxed{unclosed",
        "\\boxed{\\fbox{x}}",
        GOOD,
    ):
        want = extract_boxed(text)
        assert extract_answer(text) == (None if want is None else want.strip())
    assert extract_answer("\\boxed{a} \\boxed{b{c}}") == "b{c}"
    assert extract_answer("\\boxed{ 12 }") == "12"
    assert extract_answer("\\boxed{a} then \\boxed{unclosed") is None  # cut-off last answer


def test_build_prompt():
    p = build_prompt("  How many dogs?  ")
    assert p.startswith("How many dogs?\n\n")
    for tag in ("<vision>", "<reasoning>", "<analysis>", "<vision_confidence>", "<reasoning_confidence>"):
        assert tag in p
    assert "0 to 10" in p
    r = build_prompt("Q", "rlcr")
    assert "<confidence>N</confidence>" in r and "<vision>" not in r
    with pytest.raises(ValueError, match="protocol"):
        build_prompt("Q", "other")


def growth(parse, n: int, repeats: int = 5) -> float:
    """Time of ``parse(4·n)`` over time of ``parse(n)``, each the best of ``repeats`` (≈ 4 when linear,
    ≈ 16 when quadratic; a ratio, so a slow or loaded machine does not change it)."""
    import time

    def best(size: int) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            parse(size)
            times.append(time.perf_counter() - t0)
        return min(times)

    return best(4 * n) / best(n)


def test_adversarial_many_tags_is_fast_enough():
    # a regex with 15 lazy segments would backtrack for ages here; the scanner is linear
    def parse(n: int):
        return parse_response(("<think><vision>" * n) + "</vision>" * 10 + "<reasoning>" * n)

    p = parse(5000)
    assert not p.format_ok and p.failure is not None
    ratio = growth(parse, 10000)  # measured 4.3 on 2 loaded cores
    assert ratio < 8.0, f"4x the input took {ratio:.1f}x the time: not linear"


TAGS = [
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
    "< / vision >",
]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.one_of(
            st.sampled_from(TAGS),
            st.text(max_size=8),
            st.from_regex(r"-?[0-9]{0,3}(\.[0-9]{0,2})?", fullmatch=True),
        ),
        max_size=40,
    ),
    st.sampled_from(["decoupled", "rlcr"]),
)
def test_parse_never_raises_and_is_consistent(pieces, protocol):
    p = parse_response("".join(pieces), protocol)
    assert isinstance(p, ParsedResponse)
    assert p.format_ok == (p.failure is None)
    if p.format_ok:
        assert p.parse_ok
    for c in (p.vision_confidence, p.reasoning_confidence, p.confidence):
        assert c is None or (0.0 <= c <= 1.0 and not math.isnan(c))
    assert (p.confidence is not None) == p.parse_ok
    if protocol == "decoupled" and p.parse_ok:
        assert p.confidence == pytest.approx(overall_confidence(p.vision_confidence, p.reasoning_confidence))
    if protocol == "rlcr":
        assert p.vision_confidence is None and p.reasoning_confidence is None


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_parse_never_raises_on_any_text(text):
    assert isinstance(parse_response(text), ParsedResponse)
    span = vision_char_span(text)
    assert span is None or 0 <= span[0] <= span[1] <= len(text)


def _naive_first_box(text: str, pos: int):
    for i in range(pos, len(text)):
        for head in ("\\boxed{", "\\fbox{"):
            if text.startswith(head, i):
                depth = 1
                for j in range(i + len(head), len(text)):
                    depth += {"{": 1, "}": -1}.get(text[j], 0)
                    if depth == 0:
                        return j
    return None


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["\\boxed{", "\\fbox{", "{", "}", "x", " "]), max_size=60), st.integers(0, 5))
def test_first_box_after_matches_naive_scan(pieces, pos):
    from vlcal_verl.protocol import _first_box_after

    text = "".join(pieces)
    assert _first_box_after(text, pos) == _naive_first_box(text, pos)


def test_many_unbalanced_boxes_stay_linear():
    def parse(n: int):
        return parse_response(
            "<think><vision>a</vision><reasoning>b</reasoning></think>" + "\\boxed{" * n + "x}"
        )

    p = parse(20000)
    assert p.answer is None and not p.format_ok  # the outermost box never closes: cut off
    ratio = growth(parse, 5000)  # measured 3.5 on 2 loaded cores
    assert ratio < 8.0, f"4x the input took {ratio:.1f}x the time: not linear"


_TAG_PIECES = ["<", ">", "/", " ", "\n", "vision", "vision_confidence", "think", "confidence", "x", "é", "🐱"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(_TAG_PIECES), max_size=120), st.integers(0, 300))
def test_tag_scan_matches_finditer(pieces, n_lt):
    """_Tags' jump-from-'<' scan finds exactly the matches of _TAG_RE.finditer (brute force), also
    past its 256-'<' fallback to finditer."""
    from vlcal_verl.protocol import _TAG_RE, _Tags

    text = "<" * n_lt + "".join(pieces) if n_lt > 250 else "".join(pieces)
    expected: dict[str, tuple[list[int], list[int]]] = {}
    for m in _TAG_RE.finditer(text):
        starts, ends = expected.setdefault(m.group(1) + m.group(2), ([], []))
        starts.append(m.start())
        ends.append(m.end())
    assert _Tags(text).found == expected


# --- the fast path (one fullmatch of the exact layout) must agree with the general scanner ---------

FAST_CASES = [  # (text, protocol): layouts the fast path reads itself
    (GOOD, "decoupled"),
    ("Sure!\n" + GOOD + "\nThanks.", "decoupled"),
    (GOOD.replace("<vision>", "< vision >").replace("</think>", "< / think >"), "decoupled"),
    (conf("7.5", "10"), "decoupled"),
    (conf("11", "x"), "decoupled"),  # out of range / not a number: read by the fast path, F = 0
    (GOOD.replace("\\boxed{2}", "\\boxed{\\frac{1}{2}}"), "decoupled"),
    (GOOD.replace("\\boxed{2}", "so \\fbox{ 12 } it is"), "decoupled"),
    (RLCR_GOOD, "rlcr"),
    (GOOD.replace("\\boxed{2}", "\\boxed {2}"), "decoupled"),  # a space before the brace is still the box
]
SLOW_CASES = [  # (text, protocol): the fast path declines, the scanner decides
    (GOOD.replace("grass.", "grass, x < 3."), "decoupled"),  # a stray '<'
    (GOOD.replace("them: 2.", "them: \\boxed{1}."), "decoupled"),  # a second box
    (GOOD.replace("\\boxed{2}", "\\boxed{2"), "decoupled"),  # the box does not close in its segment
    (GOOD.replace("\\boxed{2}", "2"), "decoupled"),  # no box at all
    (GOOD.replace("<reasoning>", ""), "decoupled"),
    (GOOD, "rlcr"),
    (RLCR_GOOD, "decoupled"),
]


@pytest.mark.parametrize(("text", "protocol"), FAST_CASES)
def test_fast_path_reads_well_formed_layouts(text, protocol):
    from vlcal_verl.protocol import _parse, _parse_fast

    fast = _parse_fast(text, protocol)
    assert fast is not None  # the fast path really applies here ...
    assert fast == _parse(text, protocol) == parse_response(text, protocol)  # ... and agrees


@pytest.mark.parametrize(("text", "protocol"), SLOW_CASES)
def test_fast_path_declines_other_texts(text, protocol):
    from vlcal_verl.protocol import _parse_fast

    assert _parse_fast(text, protocol) is None


_LAYOUT = {
    "decoupled": [
        "<think>",
        "<vision>",
        "</vision>",
        "<reasoning>",
        "</reasoning>",
        "</think>",
        "<analysis>",
        "</analysis>",
        "<confidence>",
        "<vision_confidence>",
        "</vision_confidence>",
        "<reasoning_confidence>",
        "</reasoning_confidence>",
        "</confidence>",
    ],
    "rlcr": ["<think>", "</think>", "<analysis>", "</analysis>", "<confidence>", "</confidence>"],
}
_SAFE = ["", " ", "\n", "x", "é🐱", "{", "}", "3", "7.5"]
_RISKY = ["\\boxed{", "\\fbox{", "\\boxed {", "<", "<b>", "1e1"]
_FILLERS = _SAFE * 8 + _RISKY  # mostly text the fast path can take, now and then something it must not


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(["decoupled", "rlcr"]),
    st.data(),
)
def test_fast_path_agrees_with_scanner_on_layout_variations(protocol, data):
    """Texts in (or near) the protocol layout with random fillers between the tags (stray '<', boxes,
    braces, numbers, multi-byte text, tag whitespace): wherever the fast path answers, it answers
    exactly what the general scanner does."""
    from vlcal_verl.protocol import _parse, _parse_fast

    tags = list(_LAYOUT[protocol])
    answer_slot = tags.index("</think>") + 1
    pieces = []
    for k in range(len(tags) + 1):
        filler = "".join(data.draw(st.lists(st.sampled_from(_FILLERS), max_size=3)))
        if k == answer_slot and data.draw(st.booleans()):
            filler += "\\boxed{" + data.draw(st.sampled_from(["2", "x}", "{1}", ""])) + "}"
        pieces.append(filler)
        if k < len(tags):
            tag = tags[k]
            if data.draw(st.integers(0, 9)) == 0:
                tag = tag.replace("<", "< ").replace(">", " >")
            pieces.append(tag)
    text = "".join(pieces)
    fast = _parse_fast(text, protocol)
    assert fast is None or fast == _parse(text, protocol)
    assert parse_response(text, protocol) == _parse(text, protocol)
