"""String-level answer handling for grading: ``\\boxed{}`` extraction, option letters, yes/no, units.

Why a separate module: these are pure, fast string rules (no sympy), used both by
:mod:`vlcal_verl.grading` inside the worker pool and by callers that only need the boxed answer;
keeping them apart keeps ``grading.py`` about *deciding* correctness and running it safely.

Documented decisions:

* ``extract_boxed`` returns the content of the last *top-level* ``\\boxed{…}``/``\\fbox{…}``
  (nested braces kept); the last box unbalanced → None (a truncated response has no answer).
* Option letters are A–J. Upper case in any common form (``B``, ``(B)``, ``B. 12``, ``B) 12``,
  ``\\text{B}``, ``Option B``, ``answer: B``); lower case only when unambiguous (a bare ``b``/``(b)``
  or after a keyword: ``option b``) since ``a`` is also an English article. Several letters
  (``AB``, ``A, B``, ``A and B``) are rejected.
* Units, degrees (``^\\circ``, ``°``), percent (``%``, ``\\%``), currency signs and thousands
  separators (``1,000``, ``1{,}000``) are stripped before math comparison, so ``45%`` equals ``45``;
  ``0.45`` does **not** equal ``45%`` (a percent answer is compared by its number).
"""

from __future__ import annotations

import re

MC_LETTERS = "ABCDEFGHIJ"

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_TEXT_MACRO_RE = re.compile(r"\\(?:text|textrm|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)

# unit words that may follow a number; single letters need a space or \text{} (2m could be 2·m)
_UNITS_MULTI = (
    r"cm|mm|km|nm|meters?|metres?|centimeters?|centimetres?|millimeters?|kilometers?|inch(?:es)?|in\.|ft|"
    r"feet|foot|yards?|yd|miles?|mi|kg|mg|grams?|kilograms?|lbs?|pounds?|oz|ounces?|sec|seconds?|mins?|"
    r"minutes?|hrs?|hours?|days?|weeks?|months?|years?|ml|mL|liters?|litres?|units?|degrees?|deg|"
    r"dollars?|cents?|km/h|m/s|mph|kph|kPa|Pa|Hz|kHz|cm/s|people|students|points|times|square\s+\w+|"
    r"sq\s*\w+|°C|°F"
)
_UNITS_SINGLE = r"m|g|s|h|l|L|N|J|W|V"
_POWER = r"(?:\s*\^\s*\{?\s*[23]\s*\}?)?"
_UNIT_TEXT_RE = re.compile(
    rf"(?<=[\d}}).])\s*\\(?:text|textrm|mathrm|mbox)\s*\{{\s*(?:{_UNITS_MULTI}|{_UNITS_SINGLE}){_POWER}\s*\}}{_POWER}$"
)
_UNIT_PLAIN_RE = re.compile(
    rf"(?:(?<=[\d}}).])\s*(?:{_UNITS_MULTI})|(?<=[\d}}).])\s+(?:{_UNITS_SINGLE})){_POWER}$"
)
_DEGREE_RE = re.compile(r"\s*(?:\^\s*\{?\s*\\circ\s*\}?|°|\\degree|\^\s*\{?\s*o\s*\}?$)")
_THOUSANDS_RE = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_SPACING_RE = re.compile(r"\\[,;:! ]|\\quad|\\qquad")


def extract_boxed(text: str | None) -> str | None:
    """Content of the last top-level ``\\boxed{…}`` or ``\\fbox{…}`` in ``text``; None if absent/unbalanced.

    Examples:
        >>> extract_boxed(r"so \\boxed{1} then \\boxed{\\frac{1}{2}}")
        '\\\\frac{1}{2}'
        >>> extract_boxed(r"\\boxed{\\fbox{x}}")
        '\\\\fbox{x}'
        >>> extract_boxed(r"\\boxed{1") is None
        True
    """
    if not text:
        return None
    content: str | None = None
    pos = 0
    while True:
        m = _BOX_RE.search(text, pos)
        if m is None:
            return content
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth:  # the last top-level box never closes: a cut-off answer
            return None
        content = text[m.end() : i - 1]
        pos = i


def unwrap_ground_truth(ground_truth: str) -> str:
    """Strip ``<answer>…</answer>``, ``\\boxed{…}`` and ``$…$`` wrappers around a ground truth."""
    gt = ground_truth.strip()
    tags = _ANSWER_TAG_RE.findall(gt)
    if tags:
        gt = tags[-1].strip()
    if "\\boxed" in gt or "\\fbox" in gt:
        boxed = extract_boxed(gt)
        if boxed is not None:
            gt = boxed.strip()
    return gt.strip().strip("$").strip()


def _unwrap_text_macros(s: str) -> str:
    prev = None
    while prev != s:
        prev, s = s, _TEXT_MACRO_RE.sub(r"\1", s)
    return s


def _strip_outer_braces(s: str) -> str:
    """``{B}``, ``{{(A)}}`` → ``B``, ``(A)``: drop brace pairs that enclose the whole text (a model's
    ``\\boxed{{B}}`` or a ground truth written as a TeX group)."""
    s = s.strip()
    while len(s) >= 2 and s[0] == "{" and s[-1] == "}":
        depth = 0
        for i, ch in enumerate(s):
            depth += (ch == "{") - (ch == "}")
            if depth == 0 and i < len(s) - 1:
                return s  # "{a}{b}": the first brace closes early, not one group
        s = s[1:-1].strip()
    return s


def extract_choice_letter(text: str, strict: bool = True) -> str | None:
    """The single option letter A–J named by ``text`` (upper-cased), or None when none/several.

    ``strict=False`` (used for ground truths) also accepts a bare lower-case letter after stripping.

    Examples:
        >>> [extract_choice_letter(s) for s in ["B", "(B)", "B. 12", r"\\text{B}", "Option b", "AB"]]
        ['B', 'B', 'B', 'B', 'B', None]
    """
    t = _unwrap_text_macros(text.strip().strip("$").replace("*", "")).strip().rstrip(".").strip()
    t = _strip_outer_braces(t)
    m = re.fullmatch(r"\(?\s*([A-Ja-j])\s*\)?", t)
    if m:
        return m.group(1).upper()
    m = re.match(
        r"(?i:option|choice|answer(?:\s+is)?)\s*[:=]?\s*\(?\s*([A-Ja-j])\s*\)?(?=$|[\s.:)\],;])(.*)$",
        t,
        re.DOTALL,
    )
    if m is None:
        m = re.match(r"\(?([A-J])(?:\s*[.:)\]]|\s+)(.*)$", t, re.DOTALL)
    if m is None:
        return None
    rest = m.group(2).strip()
    if re.match(r"(?:,|and\b|&|/|or\b)?\s*\(?\s*[A-J]\s*\)?(?:$|[\s,.;])", rest):
        return None  # several options named: "A B", "A and B", "(A) (C)"
    return m.group(1).upper()


_BINARY = {"yes": "yes", "no": "no", "true": "yes", "false": "no"}


def extract_yes_no(text: str) -> str | None:
    """``"yes"``/``"no"`` when ``text`` starts with yes/no or true/false (any case, markup stripped), else
    None; true counts as yes and false as no (a yes/no question and a true/false one ask the same).

    >>> extract_yes_no("\\\\text{True}"), extract_yes_no("No, it is not"), extract_yes_no("maybe")
    ('yes', 'no', None)
    """
    t = _strip_outer_braces(_unwrap_text_macros(text)).lower()
    m = re.match(r"^[\s$*(\"'`]*(yes|no|true|false)\b", t)
    return _BINARY[m.group(1)] if m else None


def detect_kind(ground_truth: str) -> str:
    """``multiple_choice`` for a lone upper-case letter A–J, ``yes_no`` for yes/no or true/false, else
    ``math``."""
    t = _strip_outer_braces(_unwrap_text_macros(ground_truth).strip().strip("$"))
    if re.fullmatch(r"\(?\s*[A-J]\s*\)?\.?", t):
        return "multiple_choice"
    if t.lower().rstrip(".") in _BINARY:
        return "yes_no"
    return "math"


def normalize_math(answer: str) -> str:
    """Light, sympy-free normalisation before equivalence checks (units, degrees, %, separators).

    Examples:
        >>> [normalize_math(s) for s in ["30^\\\\circ", "45\\\\%", "12 cm", "1,000", "\\\\dfrac{1}{2}"]]
        ['30', '45', '12', '1000', '\\\\frac{1}{2}']
    """
    s = answer.strip().strip("$").strip()
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = _SPACING_RE.sub(" ", s).replace("{,}", ",")
    s = re.sub(r"\\?%$|\\%", "", s.strip())
    s = _DEGREE_RE.sub("", s).strip()
    for _ in range(2):  # "12\text{ cm}^2", then a trailing plain unit
        s = _UNIT_TEXT_RE.sub("", s).strip()
        s = _UNIT_PLAIN_RE.sub("", s).strip()
    s = re.sub(r"^(?:\\\$|\$|USD\s*)", "", s).strip()
    s = s.rstrip(".").strip() if not re.search(r"\d\.$", s) else s[:-1]
    s = re.sub(r"\s+", " ", s)
    if _THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "")
    return s
