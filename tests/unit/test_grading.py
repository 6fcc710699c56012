"""Answer grading: equivalences, option letters, yes/no, units, killable timeouts, crashed workers."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vlcal_verl.answer_normalize import detect_kind, extract_choice_letter, normalize_math
from vlcal_verl.grading import Grader, GradeResult, extract_boxed, grade_answer, grade_with_timeout

# Crafted inputs that keep in-process grading busy for minutes (confirmed > 10 s by
# test_hanging_inputs_really_hang): sympy's integer power tower (mathruler lets "**" through its "^{"
# guard) and a LaTeX factorial of 10^8 that sympy tries to evaluate.
HANGING_PRED, HANGING_GT = "9**9**9**9", "\\sqrt{2}"
HANGING_LATEX_PRED = "(10^{8})!"

CORRECT = [
    # math equivalences
    ("1/2", "0.5"),
    ("\\frac{1}{2}", "0.5"),
    ("\\dfrac{1}{2}", "\\frac12"),
    ("\\tfrac{3}{4}", "0.75"),
    ("2\\sqrt{2}", "\\sqrt{8}"),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{1}{2}\\sqrt{3}"),
    ("\\pi/2", "\\frac{\\pi}{2}"),
    ("(1,2]", "(1, 2]"),
    ("\\{1,2\\}", "\\{2,1\\}"),
    ("x^2+2x+1", "(x+1)^2"),
    ("2", "2.0"),
    ("-3", "- 3"),
    # ground truth wrappers
    ("3", "\\boxed{3}"),
    ("3", "<answer>3</answer>"),
    ("3", "<answer>\\boxed{3}</answer>"),
    ("\\boxed{7}", "7"),
    # units, degrees, percent, separators
    ("30^\\circ", "30"),
    ("30°", "30^{\\circ}"),
    ("45\\%", "45%"),
    ("45", "45\\%"),
    ("12 cm", "12"),
    ("12\\text{ cm}", "12"),
    ("10 \\text{ cm}^2", "10"),
    ("1,000", "1000"),
    ("1{,}000", "1000"),
    ("\\$5", "5"),
    ("5 dollars", "5"),
    # multiple choice
    ("B", "B"),
    ("(B)", "B"),
    ("B. 12", "B"),
    ("B) 12", "(B)"),
    ("\\text{B}", "B"),
    ("Option B", "B"),
    ("b", "B"),
    ("answer: C", "C"),
    ("J", "\\boxed{J}"),
    # yes / no
    ("Yes", "yes"),
    ("no.", "No"),
    ("\\text{Yes}, it is", "yes"),
    # true / false are the same binary answer
    ("True", "yes"),
    ("false.", "No"),
    ("Yes", "True"),
    ("\\text{False}", "false"),
]

WRONG = [
    ("4", "3"),
    ("0.333", "1/3"),
    ("[1,2]", "(1,2]"),
    ("(1,2)", "(2,1)"),
    ("\\frac{1}{3}", "0.5"),
    ("12", "21"),
    ("0.45", "45\\%"),  # a percent answer is compared by its number
    ("A", "B"),
    ("AB", "B"),
    ("A and B", "B"),
    ("(A) (B)", "B"),
    ("yes", "no"),
    ("maybe", "yes"),
    ("true", "no"),
    ("False", "True"),
    ("trueish", "yes"),
    ("\\sqrt{3}", "3"),
]


@pytest.mark.parametrize(("pred", "gt"), CORRECT)
def test_equivalent_answers_are_correct(pred, gt):
    result = grade_answer(pred, gt)
    assert result == GradeResult(True, "ok", result.method, result.detail)
    assert result.method is not None


@pytest.mark.parametrize(("pred", "gt"), WRONG)
def test_wrong_answers_are_incorrect(pred, gt):
    result = grade_answer(pred, gt)
    assert not result.correct
    assert result.status == "ok"


@pytest.mark.parametrize("pred", [None, "", "   ", "\\boxed{}", "\\boxed{1"])
def test_empty_prediction_is_no_answer(pred):
    assert grade_answer(pred, "3").status == "no_answer"
    assert not grade_answer(pred, "3").correct


def test_explicit_kind_overrides_detection_and_bad_input_is_named():
    assert grade_answer("a", "a", kind="math").correct  # a variable, not option A
    assert (
        detect_kind("B") == "multiple_choice" and detect_kind("No") == "yes_no" and detect_kind("b") == "math"
    )
    with pytest.raises(ValueError, match="kind"):
        grade_answer("1", "1", kind="essay")
    with pytest.raises(ValueError, match="ground_truth"):
        grade_answer("A", "12", kind="multiple_choice")
    with pytest.raises(TypeError, match="ground_truth"):
        grade_answer("1", ["1"])  # type: ignore[arg-type]
    assert grade_answer("12", 12).correct and grade_answer("0.5", 0.5).correct  # numbers are accepted


def test_default_grader_is_per_process():
    from vlcal_verl import grading

    grader = grading.default_grader()
    assert grading.default_grader() is grader
    grading._DEFAULT_PID = -1  # as if this process were a fork of the one that created it
    try:
        fresh = grading.default_grader()
        assert fresh is not grader and fresh.submit("1", "1").result(timeout=30).correct
    finally:
        grader.close()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("\\boxed{3}", "3"),
        ("first \\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{\\{1, \\{2\\}\\}}", "\\{1, \\{2\\}\\}"),
        ("\\boxed{{a}{b}}", "{a}{b}"),
        ("\\fbox{42}", "42"),
        ("\\boxed{\\fbox{x}}", "\\fbox{x}"),  # the outer box is the top-level one
        ("\\boxed {5}", "5"),
        ("\\boxed{1} and \\boxed{2", None),  # the last box is cut off: no answer
        ("no box here", None),
        ("", None),
        (None, None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_choice_letters_and_normalisation():
    assert [extract_choice_letter(s) for s in ["(C)", "C: 4", "Option: d", "E F", "Z"]] == [
        "C",
        "C",
        "D",
        None,
        None,
    ]
    assert normalize_math("30^{\\circ}") == "30"
    assert normalize_math("1,000,000") == "1000000"
    assert normalize_math("(1,000)") == "(1,000)"  # a tuple keeps its comma


def test_hanging_inputs_really_hang():
    """Plain in-process grading of each crafted input is still running after 10 s (run side by side)."""
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                f"from vlcal_verl.grading import grade_answer; grade_answer({pred!r}, {gt!r})",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for pred, gt in [(HANGING_PRED, HANGING_GT), (HANGING_LATEX_PRED, HANGING_GT)]
    ]
    try:
        time.sleep(10)
        assert [p.poll() for p in procs] == [None, None]
    finally:
        for p in procs:
            p.kill()
            p.wait()


@pytest.fixture(scope="module")
def grader():
    with Grader(max_workers=2, timeout_s=1.5) as g:
        yield g


@pytest.mark.parametrize("pred", [HANGING_PRED, HANGING_LATEX_PRED])
def test_timeout_is_a_graded_outcome_and_the_pool_keeps_working(grader, pred):
    start = time.monotonic()
    result = grader.submit(pred, HANGING_GT).result(timeout=30)
    elapsed = time.monotonic() - start
    assert result.status == "timeout" and not result.correct
    assert elapsed < 1.5 + 5.0  # timeout + generous slack; never the minutes sympy would take
    assert grader.submit("0.5", "\\frac{1}{2}").result(timeout=30) == GradeResult(True, "ok", "mathruler")


def test_killed_worker_is_an_error_result_and_the_pool_recovers(grader):
    crashed = grader._schedule(os._exit, (3,)).result(timeout=30)
    assert crashed.status == "error" and not crashed.correct and "exit code 3" in crashed.detail
    assert grader.submit("B. 12", "B").result(timeout=30).correct


def test_grade_many_keeps_order_and_mixes_outcomes(grader):
    items = [("1/2", "0.5", None), (HANGING_PRED, HANGING_GT, None), (None, "3", None), ("A", "B", None)]
    results = grader.grade_many(items)
    assert [(r.correct, r.status) for r in results] == [
        (True, "ok"),
        (False, "timeout"),
        (False, "no_answer"),
        (False, "ok"),
    ]


def test_grade_with_timeout_uses_a_shared_pool():
    assert grade_with_timeout("\\dfrac{1}{2}", "0.5", timeout_s=5).correct
    assert grade_with_timeout(HANGING_PRED, HANGING_GT, timeout_s=1.0).status == "timeout"
    assert grade_with_timeout("yes", "Yes", timeout_s=5).correct


def test_grader_rejects_bad_arguments():
    with pytest.raises(ValueError, match="timeout_s"):
        Grader(timeout_s=0)
    with pytest.raises(ValueError, match="max_workers"):
        Grader(max_workers=0)


def test_grading_works_off_the_main_thread():
    """math-verify's default signal timeout raises in threads; ours is disabled, so threads are fine."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        results = list(
            pool.map(lambda pair: grade_answer(*pair), [("\\{1,2\\}", "\\{2,1\\}"), ("0.5", "1/2")])
        )
    assert [(r.correct, r.method) for r in results] == [(True, "math_verify"), (True, "mathruler")]


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="ab{}\\ $()%.,0123456789ABC°", max_size=40) | st.text(max_size=40))
def test_string_rules_never_raise(text):
    extract_boxed(text)
    extract_boxed("\\boxed{" + text)
    extract_choice_letter(text)
    normalize_math(text)
    detect_kind(text)


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.text(alphabet="xy1 ", max_size=3), lambda inner: st.builds("{{{}}}".format, inner), max_leaves=6
    )
)
def test_extract_boxed_keeps_any_balanced_content(content):
    assert extract_boxed(f"pre \\boxed{{0}} mid \\boxed{{{content}}} post") == content


@pytest.mark.parametrize(
    ("prediction", "truth", "correct"),
    [
        ("{B}", "B", True),
        ("{Yes}", "yes", True),
        ("{(A)}", "A", True),
        ("{{C}}", "C", True),
        ("B", "{B}", True),
        ("{No}", "yes", False),
        ("{A}{B}", "A", False),
    ],
)
def test_braces_around_a_letter_or_yes_no_are_stripped(prediction, truth, correct):
    assert grade_answer(prediction, truth).correct is correct


def test_boxed_with_a_space_is_one_answer_for_parser_and_format():
    from vlcal_verl.protocol import parse_response

    text = (
        "<think><vision>a</vision><reasoning>b</reasoning></think>\\boxed {4}<analysis>c</analysis>"
        "<confidence><vision_confidence>8</vision_confidence><reasoning_confidence>7</reasoning_confidence>"
        "</confidence>"
    )
    parsed = parse_response(text, "decoupled")
    assert parsed.answer == "4" and parsed.format_ok and parsed.parse_ok
