"""Reference-parity mode: the authors' decouple reward rules, re-implemented (not copied).

``RewardConfig.reference_parity = True`` makes :func:`vlcal_verl.rewards.score_response` reproduce the
per-sample part of the reward in the authors' ``examples/reward_function/decouple.py`` exactly, for
comparing runs against theirs. Their rules, as read from that file:

1. Whitespace around every ``<``, ``>`` and ``/`` of the response is deleted first (also inside the
   answer: ``\\boxed{1 / 2}`` becomes ``\\boxed{1/2}``), and everything below reads the result.
2. Confidences: the first ``<confidence>`` … ``<vision_confidence>N</vision_confidence>`` …
   ``<reasoning_confidence>M</reasoning_confidence>`` … ``</confidence>`` chain where N and M are
   digits with an optional decimal part (Python ``\\d``, so any Unicode digit). If that first chain has a
   value outside [0, 10] the sample is unparsed (no second try). Φ = 2/(1/c_v + 1/c_r), 0 if either is 0.
3. Format F = 1 iff the layout think→vision→/vision→reasoning→/reasoning→/think→``\\boxed{``→``}``→
   analysis→/analysis→confidence→vision_confidence→/vision_confidence→reasoning_confidence→
   /reasoning_confidence→/confidence appears in order and both confidence contents, stripped, are
   Python floats in [0, 10] (so "1e1", "+5" or "1_0" pass; "nan" does not).
4. I from ``mathruler``: ``grade_answer(extract_boxed_content(normalised), ground_truth)``.
5. Brier = −(Φ − I)², or −1 when unparsed; visual term −(c_v − S̃)², or −1 (added by the trainer).

The authors' RLCR baseline reward (their ``rlcr_vlm`` reward function), for ``protocol='rlcr'``:

6. Rule 1 first. Confidence: the first ``<confidence>NUMBER</confidence>`` (NUMBER as in rule 2) gives
   c = min((NUMBER/10)^1.3, 1); none found counts as c = 0.5 (not as unparsed: the Brier term is
   −(c − I)² either way).
7. Format F: the *whole* response must be ``<think>``…``</think>``…``\boxed{``…``}``…``<analysis>``…
   ``</analysis>``…``<confidence>X</confidence>`` — starting with ``<think>`` and ending with the
   closing tag, nothing after it; then F = 1 if X (stripped) is a float in [1, 10], 0.5 if it is another
   float, 0 otherwise.
8. I by rule 4; R = I + w_brier·Brier + w_fmt·F with their weights 0.8 and 0.4.

Matching is an earliest-occurrence scan, which yields the same first match as their lazy regexes (a
match exists from a position iff it exists from any earlier one), in linear time.
"""

from __future__ import annotations

import re

_SPACE_AROUND_TAG_CHARS = re.compile(r"\s*([<>/])\s*")
_REF_NUMBER = re.compile(r"\d+(?:\.\d+)?")  # str pattern: \d is any Unicode decimal digit, as theirs

_LAYOUT = (
    "<think>",
    "<vision>",
    "</vision>",
    "<reasoning>",
    "</reasoning>",
    "</think>",
    "\\boxed{",
    "}",
    "<analysis>",
    "</analysis>",
    "<confidence>",
)


def normalise_tags(response: str) -> str:
    """Delete whitespace around every '<', '>' and '/' (rule 1)."""
    return _SPACE_AROUND_TAG_CHARS.sub(r"\1", response)


def _harmonic(v: float, r: float) -> float:
    # their exact float expression (2/(1/v+1/r) may differ from 2vr/(v+r) in the last bit)
    return 0.0 if v == 0.0 or r == 0.0 else 2.0 / (1.0 / v + 1.0 / r)


def _first_valid(text: str, name: str, pos: int) -> tuple[str, int] | None:
    """Earliest ``<name>NUMBER</name>`` at or after pos → (NUMBER, end), skipping invalid contents."""
    opening, closing = f"<{name}>", f"</{name}>"
    while True:
        i = text.find(opening, pos)
        if i < 0:
            return None
        start = i + len(opening)
        m = _REF_NUMBER.match(text, start)
        if m and text.startswith(closing, m.end()):
            return m.group(0), m.end() + len(closing)
        pos = i + 1


def reference_confidences(normalised: str) -> tuple[float, float, float] | None:
    """(Φ, c_v, c_r) by rule 2 on a normalised response, or None when unparsed."""
    i = normalised.find("<confidence>")
    if i < 0:
        return None
    vision = _first_valid(normalised, "vision_confidence", i + len("<confidence>"))
    if vision is None:
        return None
    reasoning = _first_valid(normalised, "reasoning_confidence", vision[1])
    if reasoning is None or normalised.find("</confidence>", reasoning[1]) < 0:
        return None
    v, r = float(vision[0]), float(reasoning[0])
    if not (0.0 <= v <= 10.0 and 0.0 <= r <= 10.0):
        return None
    v, r = v / 10.0, r / 10.0
    return _harmonic(v, r), v, r


def reference_format(normalised: str) -> float:
    """F by rule 3 on a normalised response (1.0 or 0.0)."""
    pos = 0
    for piece in _LAYOUT:
        i = normalised.find(piece, pos)
        if i < 0:
            return 0.0
        pos = i + len(piece)
    values = []
    for name in ("vision_confidence", "reasoning_confidence"):
        i = normalised.find(f"<{name}>", pos)
        if i < 0:
            return 0.0
        start = i + len(name) + 2
        j = normalised.find(f"</{name}>", start)
        if j < 0:
            return 0.0
        values.append(normalised[start:j])
        pos = j + len(name) + 3
    if normalised.find("</confidence>", pos) < 0:
        return 0.0
    try:
        v, r = (float(x.strip()) for x in values)
    except ValueError:
        return 0.0
    return 1.0 if 0.0 <= v <= 10.0 and 0.0 <= r <= 10.0 else 0.0


def reference_accuracy(normalised: str, ground_truth: str) -> float:
    """I by rule 4 (mathruler, in-process: like the authors' code, no timeout)."""
    from mathruler.grader import extract_boxed_content, grade_answer

    return 1.0 if grade_answer(extract_boxed_content(normalised), ground_truth) else 0.0


def reference_components(response: str, ground_truth: str, accuracy: float | None = None) -> dict:
    """The authors' per-sample components: I, F, Brier, Φ, c_v, c_r (``accuracy`` overrides rule 4)."""
    normalised = normalise_tags(response)
    extracted = reference_confidences(normalised)
    i_correct = reference_accuracy(normalised, ground_truth) if accuracy is None else float(accuracy)
    phi, c_v, c_r = extracted if extracted is not None else (None, None, None)
    return {
        "accuracy": i_correct,
        "format": reference_format(normalised),
        "brier": -1.0 if phi is None else -((phi - i_correct) ** 2),
        "confidence": phi,
        "vision_confidence": c_v,
        "reasoning_confidence": c_r,
        "parse_ok": extracted is not None,
    }


_RLCR_LAYOUT = ("</think>", "\\boxed{", "}", "<analysis>", "</analysis>", "<confidence>")


def reference_rlcr_confidence(normalised: str) -> float | None:
    """c by rule 6 on a normalised response, or None when no ``<confidence>NUMBER</confidence>``."""
    found = _first_valid(normalised, "confidence", 0)
    if found is None:
        return None
    return max(0.0, min((float(found[0]) / 10.0) ** 1.3, 1.0))


def reference_rlcr_format(normalised: str) -> float:
    """F by rule 7 on a normalised response (1.0, 0.5 or 0.0)."""
    opening, closing = "<think>", "</confidence>"
    if not (normalised.startswith(opening) and normalised.endswith(closing)):
        return 0.0
    limit = len(normalised) - len(closing)  # the closing tag that ends the response
    pos = len(opening)
    for piece in _RLCR_LAYOUT:
        i = normalised.find(piece, pos)
        if i < 0 or i + len(piece) > limit:
            return 0.0
        pos = i + len(piece)
    try:
        value = float(normalised[pos:limit].strip())
    except ValueError:
        return 0.0
    return 1.0 if 1.0 <= value <= 10.0 else 0.5


def reference_rlcr_components(response: str, ground_truth: str, accuracy: float | None = None) -> dict:
    """The authors' RLCR per-sample components (rules 6–8; ``accuracy`` overrides rule 4)."""
    normalised = normalise_tags(response)
    found = reference_rlcr_confidence(normalised)
    c = 0.5 if found is None else found
    i_correct = reference_accuracy(normalised, ground_truth) if accuracy is None else float(accuracy)
    return {
        "accuracy": i_correct,
        "format": reference_rlcr_format(normalised),
        "brier": -((c - i_correct) ** 2),
        "confidence": c,
        "vision_confidence": None,
        "reasoning_confidence": None,
        "parse_ok": found is not None,
    }
