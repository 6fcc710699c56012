"""The exact easy-vqa visual judge: hand-written descriptions for each rule, and the true attributes
checked against the package's own questions (read from its JSON here) and against images read by eye."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from vlcal_verl.evaluation.visual_judge import (
    COLOURS,
    SHAPES,
    add_visual_judgments,
    judge_description,
    judge_item,
    named_attributes,
    true_attributes,
    uid_attributes,
)

# (description, true colour, true shape, visual_correct, status)
CASES = [
    # the plain case, case and punctuation
    ("The image shows a red circle.", "red", "circle", 1, "correct"),
    ("RED CIRCLE", "red", "circle", 1, "correct"),
    ("Red, circle!", "red", "circle", 1, "correct"),
    ("The circle is red. A red circle.", "red", "circle", 1, "correct"),
    # plurals and accepted synonyms
    ("two red circles", "red", "circle", 1, "correct"),
    ("a grey rectangle", "gray", "rectangle", 1, "correct"),
    ("a yellow square", "yellow", "rectangle", 1, "correct"),
    ("yellow squares", "yellow", "rectangle", 1, "correct"),
    ("a circular red blob", "red", "circle", 1, "correct"),
    ("a triangular teal patch", "teal", "triangle", 1, "correct"),
    ("a rectangular brown box", "brown", "rectangle", 1, "correct"),
    # not accepted: 'round', other colour words (white is the background's, orange is not in the data)
    ("a round red shape", "red", "circle", 0, "incomplete"),
    ("a red circle on a white background", "red", "circle", 1, "correct"),
    ("an orange circle", "red", "circle", 0, "incomplete"),
    ("a shape on a white background", "red", "circle", None, "undescribed"),
    # wrong, extra, hedged
    ("a blue circle", "red", "circle", 0, "wrong"),
    ("a red triangle", "red", "circle", 0, "wrong"),
    ("a red circle and a blue square", "red", "circle", 0, "wrong"),
    ("a red circle next to a red triangle", "red", "circle", 0, "wrong"),
    ("a red or blue circle", "red", "circle", 0, "wrong"),
    ("a square", "red", "circle", 0, "wrong"),
    # one attribute only
    ("a red shape", "red", "circle", 0, "incomplete"),
    ("a circle", "red", "circle", 0, "incomplete"),
    # nothing named
    ("", "red", "circle", None, "undescribed"),
    ("The image shows no shape.", "red", "circle", None, "undescribed"),
    ("I cannot tell.", "red", "circle", None, "undescribed"),
    # whole words only; hyphens, underscores and digits separate words
    ("a reddish blue circle", "blue", "circle", 1, "correct"),
    ("redraw: a blue circle", "blue", "circle", 1, "correct"),
    ("a bluegreen circle", "teal", "circle", 0, "incomplete"),
    ("a blue-green circle", "teal", "circle", 0, "wrong"),
    ("a dark-red circle", "red", "circle", 1, "correct"),
    ("red_circle", "red", "circle", 1, "correct"),
    ("circles2 red", "red", "circle", 1, "correct"),
    ("a Triangles' tealish", "teal", "triangle", 0, "incomplete"),
    # negation: a negated term is not named
    ("not red", "red", "circle", None, "undescribed"),
    ("no blue", "red", "circle", None, "undescribed"),
    ("It is not a blue circle, it is a red circle.", "red", "circle", 1, "correct"),
    ("no blue; a red circle", "red", "circle", 1, "correct"),
    ("a red circle with no triangle", "red", "circle", 1, "correct"),
    ("neither blue nor green; a red circle", "red", "circle", 1, "correct"),
    ("The circle isn't blue but red", "red", "circle", 1, "correct"),
    ("The circle isn\u2019t blue but red", "red", "circle", 1, "correct"),
    ("a circle that is not blue, not green", "red", "circle", 0, "incomplete"),
    ("without any doubt a red circle", "red", "circle", 1, "correct"),  # 'without' is 4 words back
    ("not a big shiny blue circle", "red", "circle", 0, "wrong"),  # 'not' 4 words before blue
    ("no, a red circle", "red", "circle", 1, "correct"),  # the comma ends the negated clause
    ("not red however blue circle", "blue", "circle", 1, "correct"),
]


@pytest.mark.parametrize(("text", "colour", "shape", "expected", "status"), CASES)
def test_hand_written_descriptions(text, colour, shape, expected, status):
    j = judge_description(text, colour, shape)
    assert (j.visual_correct, j.status) == (expected, status), text


def test_named_attributes_are_canonical_and_sorted():
    assert named_attributes("A grey square and a red circles") == (("gray", "red"), ("circle", "rectangle"))
    assert named_attributes("no red, no circle") == ((), ())


def test_no_vision_span_and_bad_truth():
    assert judge_description(None, "red", "circle").status == "no_vision"
    assert judge_description(None, "red", "circle").visual_correct is None
    with pytest.raises(ValueError, match="not an easy-vqa colour"):
        judge_description("a red circle", "white", "circle")


def _package_questions(split: str) -> list[tuple[str, str, int]]:
    import easy_vqa

    path = Path(easy_vqa.__file__).parent / "data" / split / "questions.json"
    return [tuple(q) for q in json.loads(path.read_text())]


@pytest.mark.parametrize("split", ["train", "test"])
def test_true_attributes_answer_every_package_question(split):
    """Every question the package asks about an image, answered from true_attributes alone, gets the
    package's answer (attribute questions directly, yes/no ones: present XOR 'not'/'no' in the question)."""
    rows = _package_questions(split)
    checked = 0
    for question, answer, image_id in rows:
        colour, shape = true_attributes(split, image_id)
        if answer in COLOURS:
            assert colour == answer, (question, image_id)
        elif answer in SHAPES:
            assert shape == answer, (question, image_id)
        else:
            words = re.findall(r"[a-z]+", question)
            (asked,) = [w for w in words if w in COLOURS or w in SHAPES]
            present = asked in (colour, shape)
            negated = "not" in words or "no" in words
            assert answer == ("yes" if present != negated else "no"), (question, image_id)
        checked += 1
    assert checked == {"train": 38575, "test": 9673}[split]


# read by eye from the enlarged PNGs; 10–83 are images whose questions leave an attribute open (pixels
# fill it), 100 one whose shape the pixel reader alone gets wrong (circle) and the questions right
BY_EYE = {
    0: ("red", "triangle"),
    1: ("yellow", "rectangle"),
    2: ("blue", "triangle"),
    3: ("yellow", "circle"),
    10: ("red", "circle"),
    20: ("blue", "triangle"),
    22: ("green", "circle"),
    25: ("teal", "rectangle"),
    43: ("blue", "rectangle"),
    72: ("gray", "triangle"),
    73: ("yellow", "circle"),
    77: ("green", "triangle"),
    83: ("green", "rectangle"),
    100: ("black", "triangle"),
}


def test_true_attributes_match_images_read_by_eye():
    assert {i: true_attributes("test", i) for i in BY_EYE} == BY_EYE


def test_every_image_has_both_attributes():
    for split, n in (("train", 4000), ("test", 1000)):
        ids = {image_id for _, _, image_id in _package_questions(split)}
        assert len(ids) == n
        for i in ids:
            colour, shape = true_attributes(split, i)
            assert colour in COLOURS and shape in SHAPES


def test_uids_of_loaded_items_map_to_their_images():
    """data.easy_vqa's uid is the question's row: its attributes answer its own question."""
    from vlcal_verl.data.easy_vqa import load_easy_vqa

    rows = _package_questions("test")
    for it in load_easy_vqa("test", limit=30, seed=5):
        row = int(it.uid.rsplit("/", 1)[1])
        assert rows[row][:2] == (it.question, it.answer)
        assert uid_attributes(it.uid) == true_attributes("test", rows[row][2])
        assert uid_attributes(it.uid + "#unanswerable") == uid_attributes(it.uid)
    assert uid_attributes("mathvista/3") is None and uid_attributes("easy-vqa/test/99999") is None


def test_judge_item_blank_twins_and_other_benchmarks():
    colour, shape = uid_attributes("easy-vqa/test/0")
    assert judge_item("easy-vqa/test/0", f"a {colour} {shape}").visual_correct == 1
    assert judge_item("easy-vqa/test/0#unanswerable", f"a {colour} {shape}").status == "blank_image"
    assert judge_item("easy-vqa/test/0", "a red circle", unanswerable=True).visual_correct is None
    assert judge_item("mmmu/1", "a red circle") is None and judge_item(None, "x") is None


def _response(vision: str) -> str:
    return (
        f"<think><vision>{vision}</vision><reasoning>so</reasoning></think>\n\\boxed{{yes}}\n"
        "<analysis>a</analysis>\n<confidence><vision_confidence>8</vision_confidence>"
        "<reasoning_confidence>6</reasoning_confidence></confidence>"
    )


def test_add_visual_judgments_reads_the_vision_span():
    colour, shape = uid_attributes("easy-vqa/test/3")
    other = next(c for c in COLOURS if c != colour)
    recs = [
        {"uid": "easy-vqa/test/3", "response": _response(f"A {colour} {shape}."), "unanswerable": False},
        {"uid": "easy-vqa/test/3", "response": _response(f"A {other} {shape}."), "unanswerable": False},
        {"uid": "easy-vqa/test/3", "response": f"a {colour} {shape}", "unanswerable": False},  # no span
        {"uid": "easy-vqa/test/3#unanswerable", "response": _response("nothing"), "unanswerable": True},
        {"uid": "other/1", "response": _response("a red circle"), "unanswerable": False},
    ]
    out = add_visual_judgments(recs)
    got = [(r.get("visual_correct", "absent"), r.get("visual_judgment")) for r in out]
    assert got == [(1, "correct"), (0, "wrong"), (None, "no_vision"), (None, "blank_image"), ("absent", None)]
    # the RLCR protocol has no vision span
    assert add_visual_judgments(recs[:1], "rlcr")[0]["visual_judgment"] == "no_vision"
