"""The output protocol the policy writes, its prompt, and a parser that never raises.

Decoupled protocol (docs/design.md §2)::

    <think><vision> z_vis </vision><reasoning> z_reas </reasoning></think>
    \\boxed{answer}
    <analysis> ... </analysis>
    <confidence><vision_confidence>c_v</vision_confidence><reasoning_confidence>c_r</reasoning_confidence></confidence>

The RLCR baseline drops the vision/reasoning split and writes one ``<confidence>c</confidence>``.

Why a hand-written scanner instead of one big regex: a pattern of fifteen ``.*?`` segments backtracks
polynomially (or worse) on adversarial rollouts with many repeated tags, and a reward function must stay
linear in the response length. Tags are found once (whitespace around ``<``, ``/`` and ``>`` tolerated,
ASCII whitespace only, so that :mod:`vlcal_verl.spans` finds the very same tags on token bytes), then the
structure is matched left to right taking the earliest occurrence of each element — which is exactly the
match a lazy regex would find, without the backtracking.
"""

from __future__ import annotations

import bisect
import functools
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from vlcal_verl.grading import extract_boxed

Protocol = Literal["decoupled", "rlcr"]
PROTOCOLS: tuple[str, ...] = ("decoupled", "rlcr")

WS = "[ \t\n\r\f\v]*"  # ASCII whitespace only: the same bytes regex works on token bytes (spans.py)
_TAG_NAMES = (
    "vision_confidence",
    "reasoning_confidence",
    "confidence",
    "vision",
    "reasoning",
    "analysis",
    "think",
)
_TAG_RE = re.compile(f"<{WS}(/?){WS}({'|'.join(_TAG_NAMES)}){WS}>")
VISION_OPEN_RE = re.compile(f"<{WS}vision{WS}>")
VISION_CLOSE_RE = re.compile(f"<{WS}/{WS}vision{WS}>")
_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")  # as the grader's reader: "\\boxed {4}" is a box
_BRACE_RE = re.compile(r"[{}]")
_NUMBER_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)", re.ASCII)
MAX_CONFIDENCE = 10.0

# The fast path: a response laid out exactly as the protocol asks, with no other '<' and exactly one
# \boxed/\fbox (the answer, between </think> and <analysis>), is read by one fullmatch. Its segments
# cannot contain '<' and every tag starts with one, so the split points are forced and the match is
# linear. Anything else (a stray '<', a second box, a missing tag) takes the general scanner below;
# both give the same ParsedResponse wherever the fast path applies (tests/unit/test_protocol.py).
_PLAIN = "[^<]*"
_BOX_NAME_RE = re.compile(r"\\(?:boxed|fbox)")


def _block_pattern(name: str, content: str) -> str:
    """``<name>`` content ``</name>``, whitespace around the tag characters tolerated."""
    return f"<{WS}{name}{WS}>{content}<{WS}/{WS}{name}{WS}>"


def _captured(group: str) -> str:
    return f"(?P<{group}>{_PLAIN})"


def _layout(think: str, confidence: str) -> re.Pattern[str]:
    """The whole response: <think>…</think> answer <analysis>…</analysis> <confidence>…</confidence>."""
    return re.compile(
        _PLAIN
        + _block_pattern("think", think)
        + _captured("mid")  # the answer segment, between </think> and <analysis>
        + _block_pattern("analysis", _captured("analysis"))
        + _PLAIN
        + _block_pattern("confidence", confidence)
        + _PLAIN
    )


_FAST_LAYOUT = {
    "decoupled": _layout(
        think=_PLAIN
        + _block_pattern("vision", _captured("vision"))
        + _PLAIN
        + _block_pattern("reasoning", _captured("reasoning"))
        + _PLAIN,
        confidence=_PLAIN
        + _block_pattern("vision_confidence", _captured("c_v"))
        + _PLAIN
        + _block_pattern("reasoning_confidence", _captured("c_r"))
        + _PLAIN,
    ),
    "rlcr": _layout(think=_PLAIN, confidence=_captured("c")),
}


DECOUPLED_INSTRUCTIONS = """\
First think the problem through, then answer, then say how sure you are.

1. Put your thinking inside <think> </think>. Inside it, write two parts in this order:
   <vision> what you see in the image that matters for the question </vision>
   <reasoning> your step-by-step deduction from what you saw </reasoning>
2. After </think>, write the final answer inside \\boxed{}.
3. Then write <analysis> </analysis>: why your perception and your reasoning are reliable or not.
4. Finally write two confidence scores, each an integer from 0 to 10 (0 = certainly wrong, \
10 = certainly right), exactly like this:
<confidence><vision_confidence>N</vision_confidence><reasoning_confidence>M</reasoning_confidence></confidence>
vision_confidence rates how sure you are that you read the image correctly; reasoning_confidence rates \
how sure you are that your reasoning from it is correct.

Use this exact layout:
<think><vision>...</vision><reasoning>...</reasoning></think>
\\boxed{...}
<analysis>...</analysis>
<confidence><vision_confidence>N</vision_confidence><reasoning_confidence>M</reasoning_confidence></confidence>"""

RLCR_INSTRUCTIONS = """\
First think the problem through, then answer, then say how sure you are.

1. Put your thinking inside <think> </think>.
2. After </think>, write the final answer inside \\boxed{}.
3. Then write <analysis> </analysis>: why your answer is reliable or not.
4. Finally write one confidence score, an integer from 0 to 10 (0 = certainly wrong, \
10 = certainly right), as <confidence>N</confidence>.

Use this exact layout:
<think>...</think>
\\boxed{...}
<analysis>...</analysis>
<confidence>N</confidence>"""


PROMPT_TEMPLATE_ENV = "VLCAL_PROMPT_TEMPLATE"
"""A Jinja file that replaces the built-in instructions wherever prompts are built (``vlcal data``,
``vlcal eval``, the demo): it renders ``{{ content }}``, the question (the variable the authors' templates
use, so their files work by path). ``--prompt-template FILE`` sets it for one command."""


def load_prompt_template(path: str | os.PathLike) -> Any:
    """A compiled Jinja template from ``path``; ValueError naming the problem (missing file, a template
    that never renders the question, a Jinja syntax error)."""
    import jinja2
    import jinja2.meta

    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"prompt template: no such file: {p}")
    text = p.read_text(encoding="utf-8").strip()
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False)
    try:
        names = jinja2.meta.find_undeclared_variables(env.parse(text))
    except jinja2.TemplateSyntaxError as err:
        raise ValueError(f"prompt template {p}: line {err.lineno}: {err.message}") from None
    if "content" not in names:
        raise ValueError(f"prompt template {p} never uses {{{{ content }}}} (the question)")
    if names - {"content"}:
        raise ValueError(f"prompt template {p}: unknown variables {sorted(names - {'content'})}")
    return env.from_string(text)


def active_prompt_template() -> Any | None:
    """The template named by :data:`PROMPT_TEMPLATE_ENV`, or None (the built-in instructions)."""
    path = os.environ.get(PROMPT_TEMPLATE_ENV)
    return _cached_template(path) if path else None


@functools.lru_cache(maxsize=8)
def _cached_template(path: str) -> Any:
    return load_prompt_template(path)


def build_prompt(question: str, protocol: str = "decoupled", template: Any | None = None) -> str:
    """Return the user-turn text: the question followed by the protocol's instructions, or ``template``
    (a :func:`load_prompt_template` result; default :func:`active_prompt_template`) rendered with it.

    >>> build_prompt("How many dogs?").startswith("How many dogs?\\n\\nFirst think")
    True
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if not isinstance(question, str):
        raise TypeError(f"question must be a str, got {type(question).__name__}")
    template = template if template is not None else active_prompt_template()
    if template is not None:
        return template.render(content=question)
    body = DECOUPLED_INSTRUCTIONS if protocol == "decoupled" else RLCR_INSTRUCTIONS
    return f"{question.strip()}\n\n{body}"


@dataclass(frozen=True)
class ParsedResponse:
    """What a response says under a protocol. Confidences are normalised to [0, 1] (c/10).

    ``format_ok`` is F: the full structure is present in order and every confidence is in [0, 10].
    ``parse_ok``: every confidence of the protocol was read (c_v and c_r, or the single RLCR one).
    ``failure`` says why F is 0 (None when F is 1). ``confidence`` is Φ(c_v, c_r) for the decoupled
    protocol, the single confidence for RLCR, None when ``parse_ok`` is False.
    """

    protocol: str
    format_ok: bool
    parse_ok: bool
    failure: str | None
    vision: str | None
    reasoning: str | None
    answer: str | None
    analysis: str | None
    vision_confidence: float | None
    reasoning_confidence: float | None
    confidence: float | None


def overall_confidence(c_v: float, c_r: float) -> float:
    """Φ(c_v, c_r) = 2·c_v·c_r / (c_v + c_r), and 0 when either is 0 (harmonic mean).

    >>> overall_confidence(0.8, 0.4)  # 2·0.32/1.2
    0.5333333333333333
    >>> overall_confidence(0.0, 0.9)
    0.0
    """
    if c_v <= 0.0 or c_r <= 0.0:
        return 0.0
    return 2.0 * c_v * c_r / (c_v + c_r)


def vision_char_span(text: str) -> tuple[int, int] | None:
    """Character range [start, end) of z_vis: the text strictly between the first ``<vision>`` and the
    first ``</vision>`` after it. None when there is no closed vision block.

    >>> vision_char_span("<think><vision>a cat</vision>")
    (15, 20)
    """
    if not isinstance(text, str):
        return None
    opening = VISION_OPEN_RE.search(text)
    if opening is None:
        return None
    closing = VISION_CLOSE_RE.search(text, opening.end())
    if closing is None:
        return None
    return opening.end(), closing.start()


class _Tags:
    """Positions of every protocol tag in a text, for earliest-after lookups in O(log n).

    Tags are found by jumping from ``<`` to ``<`` with ``str.find`` and trying ``_TAG_RE`` there: a tag
    match holds exactly one ``<`` (its first character), so this yields the same non-overlapping
    matches as ``_TAG_RE.finditer`` at a fraction of the cost on typical text. Past 256 ``<`` the rest
    of the text is left to ``finditer`` so the Python loop stays short on adversarial input.
    """

    def __init__(self, text: str) -> None:
        # key "/think" for </think>, "think" for <think> → ([starts], [ends])
        self.found: dict[str, tuple[list[int], list[int]]] = {}
        setdefault, find, match, pos = self.found.setdefault, text.find, _TAG_RE.match, 0
        for _ in range(256):
            pos = find("<", pos)
            if pos < 0:
                return
            m = match(text, pos)
            if m is None:
                pos += 1
                continue
            starts, ends = setdefault(m.group(1) + m.group(2), ([], []))
            starts.append(pos)
            ends.append(pos := m.end())
        for m in _TAG_RE.finditer(text, pos):
            starts, ends = setdefault(m.group(1) + m.group(2), ([], []))
            starts.append(m.start())
            ends.append(m.end())

    def vision_span(self) -> tuple[int, int] | None:
        """Same as :func:`vision_char_span`: z_vis between the first ``<vision>`` and the next ``</vision>``."""
        opening = self.find("vision", False, 0)
        closing = None if opening is None else self.find("vision", True, opening[1])
        return None if closing is None else (opening[1], closing[0])

    def find(self, name: str, closing: bool, pos: int) -> tuple[int, int] | None:
        """(start, end) of the first ``<name>`` (or ``</name>``) starting at or after ``pos``."""
        found = self.found.get("/" + name if closing else name)
        if found is None:
            return None
        starts, ends = found
        if len(starts) == 1:  # the usual case: each tag once
            return (starts[0], ends[0]) if starts[0] >= pos else None
        i = bisect.bisect_left(starts, pos)
        return (starts[i], ends[i]) if i < len(starts) else None


def _block(tags: _Tags, text: str, name: str, pos: int) -> tuple[str | None, int, int, int]:
    """Content of the first ``<name>…</name>`` at or after pos → (content, open_start, close_end, miss).

    ``miss`` is 0 when found, 1 when the opening tag is missing, 2 when the closing one is.
    """
    opening = tags.find(name, False, pos)
    if opening is None:
        return None, -1, -1, 1
    closing = tags.find(name, True, opening[1])
    if closing is None:
        return None, opening[0], -1, 2
    return text[opening[1] : closing[0]], opening[0], closing[1], 0


def _read_confidence(raw: str | None, name: str) -> tuple[float | None, str | None]:
    """A confidence in [0, 10] normalised to [0, 1], or (None, why)."""
    if raw is None:
        return None, f"missing <{name}>"
    value = raw.strip()
    if len(value) == 1 and "0" <= value <= "9":  # the usual answer, a single digit
        return int(value) / MAX_CONFIDENCE, None
    if not _NUMBER_RE.fullmatch(value):
        return None, f"{name} is not a number: {value[:40]!r}"
    number = float(value)
    if not (math.isfinite(number) and 0.0 <= number <= MAX_CONFIDENCE):
        return None, f"{name} out of range [0, 10]: {value[:40]}"
    return number / MAX_CONFIDENCE, None


def _matching_braces(text: str) -> dict[int, int]:
    """Map the index of each '{' to the index of its matching '}' (one pass over the braces only)."""
    stack: list[int] = []
    match: dict[int, int] = {}
    for m in _BRACE_RE.finditer(text):
        if m.group() == "{":
            stack.append(m.start())
        elif stack:
            match[stack.pop()] = m.start()
    return match


def _close_of(text: str, start: int) -> int | None:
    """Index of the '}' closing the '{' just before ``start``, or None (depth counting on braces only)."""
    depth = 1
    for b in _BRACE_RE.finditer(text, start):
        depth += 1 if b.group() == "{" else -1
        if depth == 0:
            return b.start()
    return None


def _first_box_after(text: str, pos: int) -> int | None:
    """Closing-brace index of the first balanced ``\\boxed{…}``/``\\fbox{…}`` starting at or after pos.

    Each box is closed by a scan of the braces after it; past a few unbalanced boxes (adversarial text)
    one linear pass matches all braces instead, so the cost stays linear.
    """
    for k, m in enumerate(_BOX_RE.finditer(text, pos)):
        if k == 8:
            braces = _matching_braces(text)
            later = (braces.get(b.end() - 1) for b in _BOX_RE.finditer(text, m.start()))
            return next((c for c in later if c is not None), None)
        close = _close_of(text, m.end())
        if close is not None:
            return close
    return None


def extract_answer(text: str) -> str | None:
    """Content of the last top-level ``\\boxed{}``/``\\fbox{}``, stripped; None when absent or cut off.

    Delegates to :func:`vlcal_verl.grading.extract_boxed`, so the parser and the grader agree.
    """
    content = extract_boxed(text)
    return None if content is None else content.strip()


def _strip(s: str | None) -> str | None:
    return None if s is None else s.strip()


def _structure_failure(tags: _Tags, text: str, protocol: str, conf_start: int) -> str | None:
    """First element of the protocol layout that is missing (in order), or None."""
    think = tags.find("think", False, 0)
    if think is None:
        return "missing <think>"
    pos = think[1]
    if protocol == "decoupled":
        for name in ("vision", "reasoning"):
            _, _, end, miss = _block(tags, text, name, pos)
            if miss:
                return f"missing <{'/' if miss == 2 else ''}{name}> inside <think>"
            pos = end
    close = tags.find("think", True, pos)
    if close is None:
        return "missing </think>"
    pos = close[1]
    box_close = _first_box_after(text, pos)
    if box_close is None:
        return "missing \\boxed{} answer after </think>"
    _, _, end, miss = _block(tags, text, "analysis", box_close + 1)
    if miss:
        return f"missing <{'/' if miss == 2 else ''}analysis> after the answer"
    if conf_start < end:
        return "<confidence> block does not follow </analysis>"
    return None


def _parse_confidences(tags: _Tags, text: str, protocol: str) -> tuple[list[float | None], int, str | None]:
    """Read the first ``<confidence>`` block → ([c_v, c_r] or [c], block start, first failure)."""
    if protocol == "rlcr":
        raw, start, _, miss = _block(tags, text, "confidence", 0)
        if miss:
            return [None], start, f"missing <{'/' if miss == 2 else ''}confidence>"
        value, why = _read_confidence(raw, "confidence")
        return [value], start, why
    opening = tags.find("confidence", False, 0)
    if opening is None:
        return [None, None], -1, "missing <confidence>"
    pos, values, failure = opening[1], [], None
    for name in ("vision_confidence", "reasoning_confidence"):
        raw, _, end, miss = _block(tags, text, name, pos)
        value, why = _read_confidence(raw, name) if not miss else (None, f"missing <{name}>")
        if miss == 2:
            why = f"missing </{name}>"
        values.append(value)
        failure = failure or why
        pos = end if end >= 0 else pos
    if tags.find("confidence", True, pos) is None:
        failure = failure or "missing </confidence>"
        values = [None, None]
    return values, opening[0], failure


def parse_response(text: str, protocol: str = "decoupled") -> ParsedResponse:
    """Parse a response under ``protocol`` ("decoupled" or "rlcr"). Never raises.

    >>> p = parse_response("<think><vision>2 dogs</vision><reasoning>so 2</reasoning></think>"
    ...     "\\\\boxed{2}<analysis>clear</analysis><confidence><vision_confidence>8"
    ...     "</vision_confidence><reasoning_confidence>6</reasoning_confidence></confidence>")
    >>> p.format_ok, p.answer, p.vision_confidence, p.reasoning_confidence, round(p.confidence, 4)
    (True, '2', 0.8, 0.6, 0.6857)
    """
    if protocol not in PROTOCOLS:
        protocol, bad_protocol = "decoupled", True
    else:
        bad_protocol = False
    if not isinstance(text, str):
        return _unparsed(protocol, f"response is not a str: {type(text).__name__}")
    if bad_protocol:
        return _unparsed(protocol, "unknown protocol")
    try:
        return _parse_fast(text, protocol) or _parse(text, protocol)
    except Exception as err:  # defensive: a reward function must never crash on a rollout
        return _unparsed(protocol, f"parser error: {type(err).__name__}")


def _unparsed(protocol: str, failure: str) -> ParsedResponse:
    return ParsedResponse(protocol, False, False, failure, None, None, None, None, None, None, None)


def _parse_fast(text: str, protocol: str) -> ParsedResponse | None:
    """The parse of a response in the exact layout (see ``_FAST_LAYOUT``), or None for anything else."""
    m = _FAST_LAYOUT[protocol].fullmatch(text)
    if m is None:
        return None
    answer_segment = m["mid"]  # between </think> and <analysis>
    # the only box of the text in that segment and closing there: both box readers then agree with
    # their whole-text runs; anything else (or "\\boxed {", which only one of them reads) goes the
    # general way
    box = _BOX_RE.search(answer_segment)
    if box is None or len(_BOX_NAME_RE.findall(text)) != 1:
        return None
    close = _close_of(answer_segment, box.end())
    if close is None:
        return None
    answer = answer_segment[box.end() : close].strip()
    analysis = m["analysis"].strip()
    if protocol == "rlcr":
        c, why = _read_confidence(m["c"], "confidence")
        return ParsedResponse(
            protocol, why is None, c is not None, why, None, None, answer, analysis, None, None, c
        )
    c_v, why_v = _read_confidence(m["c_v"], "vision_confidence")
    c_r, why_r = _read_confidence(m["c_r"], "reasoning_confidence")
    parse_ok = c_v is not None and c_r is not None
    failure = why_v or why_r
    return ParsedResponse(
        protocol=protocol,
        format_ok=failure is None,
        parse_ok=parse_ok,
        failure=failure,
        vision=m["vision"].strip(),
        reasoning=m["reasoning"].strip(),
        answer=answer,
        analysis=analysis,
        vision_confidence=c_v,
        reasoning_confidence=c_r,
        confidence=overall_confidence(c_v, c_r) if parse_ok else None,
    )


def _parse(text: str, protocol: str) -> ParsedResponse:
    """The general scanner: any text, linear time."""
    tags = _Tags(text)
    values, conf_start, conf_failure = _parse_confidences(tags, text, protocol)
    parse_ok = all(v is not None for v in values)
    structure_failure = _structure_failure(tags, text, protocol, conf_start if conf_start >= 0 else 1 << 62)
    if protocol == "decoupled":
        c_v, c_r = values
        confidence = overall_confidence(c_v, c_r) if parse_ok else None
        span = tags.vision_span()
        vision = text[span[0] : span[1]].strip() if span else None
        reasoning = _strip(_block(tags, text, "reasoning", 0)[0])
    else:
        c_v = c_r = vision = reasoning = None
        confidence = values[0]
    answer = extract_answer(text)
    if answer is None and structure_failure is None:
        structure_failure = "last \\boxed{} is cut off"
    failure = structure_failure or conf_failure
    return ParsedResponse(
        protocol=protocol,
        format_ok=failure is None,
        parse_ok=parse_ok,
        failure=failure,
        vision=vision,
        reasoning=reasoning,
        answer=answer,
        analysis=_strip(_block(tags, text, "analysis", 0)[0]),
        vision_confidence=c_v,
        reasoning_confidence=c_r,
        confidence=confidence,
    )
