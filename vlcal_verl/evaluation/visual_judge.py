"""The exact visual judge for easy-vqa: did z_vis (the ``<vision>`` span) see the image right?

Every easy-vqa image shows one shape of one colour, and the data says which (``true_attributes``), so
"the model saw it right" needs no external judge: a description is visually correct when it names the
true colour and the true shape and no other colour or shape. The truth comes from the package's own
questions about the image id (an answer "red", "what is the color of the triangle?", "is there not a
blue shape?" → no); where they leave the colour or the shape open (112 of the 1,000 test images, 422 of
the 4,000 train images) it is read off the pixels (``demo.data.image_facts``: the palette colour, and
the shape by the fill ratio of its bounding box — which agrees with the questions on all but 3 of the
4,791 images whose questions give the shape; the colour agrees on all of them).

The rules (README "Data and evaluation" has them as a table):

* Vocabulary — the package's answers: colours red, green, blue, black, gray, teal, brown, yellow; shapes
  circle, rectangle, triangle. Also accepted: ``grey`` (gray), plurals (``circles``), the adjectives
  ``circular`` / ``rectangular`` / ``triangular``, and ``square(s)`` for rectangle (easy-vqa's
  rectangles include squares). Any other word is ignored — ``white`` (the background is a light tint),
  ``orange``, ``round``, ``shape``.
* Whole words, case-insensitive: any character other than a letter or an apostrophe separates words,
  so ``Red.``, ``dark-red`` and ``red_circle`` name red, ``blue-green`` names blue *and* green, while
  ``reddish``, ``bluegreen`` and ``redraw`` name nothing.
* Negation: a term is not named when a negator (no, not, never, without, nor, neither, none, cannot,
  or a word ending in ``n't``) stands among the 3 words before it, within its clause (punctuation
  ``. , ; : ! ? ( ) [ ] { }`` and but / however / instead / rather / though / although / yet end a
  clause). "not a red circle, a blue circle" names blue and circle; "no red or blue" names nothing.
* Verdict: names neither a colour nor a shape → None, *undescribed*; exactly {true colour} and
  {true shape} → 1, *correct*; any other colour or shape named (a wrong one, or an extra one as in
  "a red circle and a blue square", or a hedge "red or blue") → 0, *wrong*; only one of the two
  named, rightly → 0, *incomplete*. A response without a closed ``<vision>`` block (or under the RLCR protocol)
  → None, *no_vision*. An unanswerable twin (blank image) → None, *blank_image*: nothing is there to
  describe, and the no-image gap of the report uses c_v, not this judgment.

No torch: the package's JSON, and PIL + numpy for the images whose questions leave something open.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

COLOURS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
SHAPES = ("circle", "rectangle", "triangle")
SYNONYMS: dict[str, str] = {
    **{c: c for c in COLOURS},
    "grey": "gray",
    **{s: s for s in SHAPES},
    **{s + "s": s for s in SHAPES},
    "circular": "circle",
    "rectangular": "rectangle",
    "square": "rectangle",
    "squares": "rectangle",
    "triangular": "triangle",
}
NEGATORS = frozenset({"no", "not", "never", "without", "nor", "neither", "none", "cannot"})
CLAUSE_WORDS = frozenset({"but", "however", "instead", "rather", "though", "although", "yet"})
NEGATION_WINDOW = 3
STATUSES = ("correct", "wrong", "incomplete", "undescribed", "no_vision", "blank_image")

_TOKEN_RE = re.compile(r"[a-z]+(?:'[a-z]+)*|[.,;:!?()\[\]{}]")
_UID_RE = re.compile(r"easy-vqa/(train|test)/(\d+)(#unanswerable)?")


@dataclass(frozen=True)
class Judgment:
    """``visual_correct`` (1 / 0 / None), its ``status`` (one of :data:`STATUSES`) and what was named."""

    visual_correct: int | None
    status: str
    colours: tuple[str, ...] = ()
    shapes: tuple[str, ...] = ()


def _negated(tokens: list[str], k: int) -> bool:
    """Whether a negator stands among the NEGATION_WINDOW words before token k, in the same clause."""
    for tok in reversed(tokens[max(0, k - NEGATION_WINDOW) : k]):
        if not tok[0].isalpha() or tok in CLAUSE_WORDS:
            return False
        if tok in NEGATORS or tok.endswith("n't"):
            return True
    return False


def named_attributes(text: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(colours, shapes) the text names, canonical and sorted, negated mentions left out.

    >>> named_attributes("Not a red circle: a grey square.")
    (('gray',), ('rectangle',))
    """
    tokens = _TOKEN_RE.findall(text.casefold().replace("\u2019", "'"))
    named = {SYNONYMS[t] for k, t in enumerate(tokens) if t in SYNONYMS and not _negated(tokens, k)}
    return tuple(sorted(named & set(COLOURS))), tuple(sorted(named & set(SHAPES)))


def judge_description(text: str | None, colour: str, shape: str) -> Judgment:
    """Judge z_vis against the image's true ``colour`` and ``shape`` (see the module docstring).

    >>> judge_description("The image shows a blue rectangle.", "blue", "rectangle").visual_correct
    1
    >>> judge_description("a red circle and a blue square", "red", "circle").status
    'wrong'
    """
    if colour not in COLOURS or shape not in SHAPES:
        raise ValueError(f"not an easy-vqa colour and shape: {colour!r}, {shape!r}")
    if text is None:
        return Judgment(None, "no_vision")
    colours, shapes = named_attributes(text)
    if not colours and not shapes:
        return Judgment(None, "undescribed")
    if set(colours) <= {colour} and set(shapes) <= {shape}:
        full = colours == (colour,) and shapes == (shape,)
        return Judgment(1 if full else 0, "correct" if full else "incomplete", colours, shapes)
    return Judgment(0, "wrong", colours, shapes)


# ----------------------------------------------------------------------------- ground truth


def _evidence(question: str, answer: str) -> list[tuple[str, bool]]:
    """(attribute, present?) pairs one question/answer states about its image."""
    words = set(re.findall(r"[a-z]+", question.lower()))
    mentioned = [w for w in (*COLOURS, *SHAPES) if w in words]
    if answer in ("yes", "no"):
        present = (answer == "yes") != bool(words & {"no", "not"})
        return [(w, present) for w in mentioned]
    # "what is the color of the triangle?" → red: both the answer and the subject are present
    return [(answer, True), *((w, True) for w in mentioned)]


def _resolve(facts: Mapping[str, bool], vocabulary: tuple[str, ...], image_id: int) -> str | None:
    present = {w for w, p in facts.items() if p and w in vocabulary}
    absent = {w for w, p in facts.items() if not p and w in vocabulary}
    if len(present) > 1:
        raise ValueError(f"easy-vqa image {image_id}: questions name several: {sorted(present)}")
    if present:
        return present.pop()
    left = [w for w in vocabulary if w not in absent]
    return left[0] if len(left) == 1 else None


@functools.lru_cache(maxsize=2)
def _split_truth(split: str) -> tuple[tuple[int, ...], dict[int, tuple[str | None, str | None]]]:
    """(image id of each question row, {image id: (colour, shape)}): the questions, then the pixels."""
    import easy_vqa

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    load = easy_vqa.get_train_questions if split == "train" else easy_vqa.get_test_questions
    texts, answers, image_ids = load()
    facts: dict[int, dict[str, bool]] = {}
    for q, a, image_id in zip(texts, answers, image_ids, strict=True):
        seen = facts.setdefault(image_id, {})
        for word, present in _evidence(q, a):
            if seen.setdefault(word, present) != present:
                raise ValueError(f"easy-vqa image {image_id}: questions disagree about {word!r}")
    truth = {i: (_resolve(f, COLOURS, i), _resolve(f, SHAPES, i)) for i, f in facts.items()}
    open_ids = [i for i, t in truth.items() if None in t]
    if open_ids:  # ~11% of images: their questions leave the colour or the shape open
        from PIL import Image

        from vlcal_verl.demo.data import image_facts

        paths = easy_vqa.get_train_image_paths() if split == "train" else easy_vqa.get_test_image_paths()
        for i in open_ids:
            with Image.open(paths[i]) as im:
                seen = image_facts(im)
            truth[i] = (truth[i][0] or seen.color, truth[i][1] or seen.shape)
    return tuple(image_ids), truth


def true_attributes(split: str, image_id: int) -> tuple[str | None, str | None]:
    """(colour, shape) of easy-vqa image ``image_id`` of ``split``: as its questions state them, the
    pixels for what they leave open (KeyError for an unknown id)."""
    return _split_truth(split)[1][image_id]


def uid_attributes(uid: str) -> tuple[str | None, str | None] | None:
    """(colour, shape) of the image of an easy-vqa item uid (``easy-vqa/test/12``, the question row of
    ``data.easy_vqa``; a ``#unanswerable`` twin gives its answerable item's); None for other uids."""
    m = _UID_RE.fullmatch(str(uid))
    if m is None:
        return None
    image_ids, truth = _split_truth(m.group(1))
    row = int(m.group(2))
    return truth[image_ids[row]] if row < len(image_ids) else None


def judge_item(uid: Any, vision: str | None, unanswerable: bool = False) -> Judgment | None:
    """The judgment of one easy-vqa item's z_vis (``vision``: the parsed span, None when absent);
    None when the uid is not an easy-vqa item's or its image's attributes are unknown."""
    truth = uid_attributes(uid) if uid is not None else None
    if truth is None or None in truth:
        return None
    if unanswerable or str(uid).endswith("#unanswerable"):
        return Judgment(None, "blank_image")
    return judge_description(vision, *truth)


def add_visual_judgments(records: Iterable[dict[str, Any]], protocol: str = "decoupled") -> list[dict]:
    """Records of ``score_generations`` with ``visual_correct`` (1 / 0 / None) and ``visual_judgment``
    (the status) added to every easy-vqa item (others are left as they are); z_vis is the vision span
    :func:`vlcal_verl.protocol.parse_response` reads from the record's ``response``."""
    from vlcal_verl.protocol import parse_response

    out = []
    for r in records:
        uid, blank = r.get("uid"), bool(r.get("unanswerable"))
        vision = None
        if not blank and uid is not None and uid_attributes(uid) is not None:  # parse only what is judged
            vision = parse_response(r.get("response", ""), protocol).vision
        j = judge_item(uid, vision, blank)
        out.append(r if j is None else {**r, "visual_correct": j.visual_correct, "visual_judgment": j.status})
    return out
