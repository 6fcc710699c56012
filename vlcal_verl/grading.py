"""Answer grading: the correctness indicator I ∈ {0, 1} of the reward, with a killable timeout.

Why this module exists: I is the backbone of every reward component (R = I + w_brier·(−(Φ − I)²) + …),
so grading must be lenient where answers are equivalent (``1/2`` = ``0.5`` = ``\\frac{1}{2}``,
``30^\\circ`` = ``30``, ``(B)`` = ``B``) and must never hang a trainer: sympy can spin for minutes on
crafted input (``9**9**9**9``), so grading runs in a process pool whose workers are *killed* on timeout.

Design choices:

* Math equivalence: our own light normalisation (units, degrees, percent, thousands separators),
  then ``mathruler`` (PRM800K-style normalise + sympy), then ``math-verify`` as a second opinion.
  An answer is correct when either checker accepts it; ``GradeResult.method`` says which.
* ``math-verify`` is always called with its signal timeouts disabled (``parsing_timeout=None``,
  ``timeout_seconds=None``): its ``signal.alarm`` only works in the main thread (a reward server or a
  verl reward thread would get ``ValueError``) and it would fight any other SIGALRM user. The killable
  timeout is the pool's job (:class:`Grader`), which works for every library, not just math-verify.
* A timeout or a crashed worker is a graded outcome, ``GradeResult(False, "timeout"|"error")``,
  never an exception and never a hang.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import importlib
import logging
import multiprocessing
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from vlcal_verl.answer_normalize import (
    MC_LETTERS,
    detect_kind,
    extract_boxed,
    extract_choice_letter,
    extract_yes_no,
    normalize_math,
    unwrap_ground_truth,
)

__all__ = [
    "GradeResult",
    "Grader",
    "default_grader",
    "extract_boxed",
    "grade_answer",
    "grade_with_timeout",
]

Kind = Literal["math", "multiple_choice", "yes_no"]
KINDS: tuple[str, ...] = ("math", "multiple_choice", "yes_no")
_PRELOAD = ("vlcal_verl.grading", "mathruler.grader", "math_verify")


class _DropMathVerifyTimeoutWarning(logging.Filter):
    """math-verify warns once per process that its timeout is disabled; we disable it on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropMathVerifyTimeoutWarning())


@dataclass(frozen=True)
class GradeResult:
    """Outcome of grading one answer.

    Attributes:
        correct: I — True when the prediction matches the ground truth.
        status: ``"ok"`` (graded), ``"no_answer"`` (empty/None prediction), ``"timeout"`` (the worker
            was killed after ``timeout_s``), ``"error"`` (a checker or a worker crashed).
        method: which rule decided (``"exact"``, ``"mathruler"``, ``"math_verify"``,
            ``"multiple_choice"``, ``"yes_no"``), None when nothing matched.
        detail: a short human-readable reason (what was compared, or the error).

    Example:
        >>> grade_answer("\\\\frac{1}{2}", "0.5")
        GradeResult(correct=True, status='ok', method='mathruler', detail=None)
    """

    correct: bool
    status: Literal["ok", "no_answer", "timeout", "error"] = "ok"
    method: str | None = None
    detail: str | None = None


def grade_answer(prediction: str | None, ground_truth: str, kind: str | None = None) -> GradeResult:
    """Grade ``prediction`` against ``ground_truth`` in-process, with no timeout (see :class:`Grader`).

    ``prediction`` is the *answer* (e.g. the content of the last ``\\boxed{}``); a prediction that still
    contains a ``\\boxed{}`` is reduced to its last box. ``ground_truth`` may be wrapped in ``\\boxed{}``
    or ``<answer>…</answer>``. ``kind`` is ``"math"``, ``"multiple_choice"``, ``"yes_no"`` or None to
    detect it from the ground truth (a lone letter A–J → multiple choice; yes/no → yes_no; else math).

    Examples:
        >>> grade_answer("(B) 12", "B").correct
        True
        >>> grade_answer("30°", "\\\\boxed{30^\\\\circ}").correct
        True
        >>> grade_answer(None, "3").status
        'no_answer'
    """
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS} or None, got {kind!r}")
    if isinstance(ground_truth, int | float) and not isinstance(ground_truth, bool):
        ground_truth = repr(ground_truth) if isinstance(ground_truth, float) else str(ground_truth)
    if not isinstance(ground_truth, str):
        raise TypeError(f"ground_truth must be a str (or a number), got {type(ground_truth).__name__}")
    if prediction is None or not str(prediction).strip():
        return GradeResult(False, "no_answer", None, "empty prediction")
    pred = str(prediction).strip()
    if "\\boxed" in pred or "\\fbox" in pred:
        boxed = extract_boxed(pred)
        if boxed is None or not boxed.strip():
            return GradeResult(False, "no_answer", None, "unbalanced or empty \\boxed{}")
        pred = boxed.strip()
    gt = unwrap_ground_truth(ground_truth)
    kind = kind or detect_kind(gt)
    if kind == "multiple_choice":
        return _grade_multiple_choice(pred, gt)
    if kind == "yes_no":
        return _grade_yes_no(pred, gt)
    return _grade_math(pred, gt)


def _grade_multiple_choice(pred: str, gt: str) -> GradeResult:
    want = extract_choice_letter(gt, strict=False)
    if want is None or want not in MC_LETTERS:
        raise ValueError(f"ground_truth {gt!r} is not an option letter A–J (kind='multiple_choice')")
    got = extract_choice_letter(pred)
    if got is None:
        return GradeResult(False, "ok", "multiple_choice", f"no single option letter in {pred[:40]!r}")
    return GradeResult(got == want, "ok", "multiple_choice", f"{got} vs {want}")


def _grade_yes_no(pred: str, gt: str) -> GradeResult:
    want = extract_yes_no(gt)
    if want is None:
        raise ValueError(f"ground_truth {gt!r} is not yes/no (kind='yes_no')")
    got = extract_yes_no(pred)
    if got is None:
        return GradeResult(False, "ok", "yes_no", f"no yes/no in {pred[:40]!r}")
    return GradeResult(got == want, "ok", "yes_no", f"{got} vs {want}")


def _grade_math(pred: str, gt: str) -> GradeResult:
    pred_n, gt_n = normalize_math(pred), normalize_math(gt)
    if not pred_n:
        return GradeResult(False, "no_answer", None, "prediction empty after normalisation")
    if pred_n == gt_n:
        return GradeResult(True, "ok", "exact", None)
    errors: list[str] = []
    try:
        from mathruler.grader import grade_answer as mathruler_grade

        if mathruler_grade(pred_n, gt_n) or ((pred_n, gt_n) != (pred, gt) and mathruler_grade(pred, gt)):
            return GradeResult(True, "ok", "mathruler", None)
    except Exception as err:  # mathruler swallows most errors itself; be safe anyway
        errors.append(f"mathruler: {type(err).__name__}: {err}")
    try:
        if _math_verify_equal(pred_n, gt_n):
            return GradeResult(True, "ok", "math_verify", None)
    except Exception as err:
        errors.append(f"math_verify: {type(err).__name__}: {err}")
    if len(errors) == 2:
        return GradeResult(False, "error", None, "; ".join(errors))
    return GradeResult(False, "ok", None, "; ".join(errors) or None)


def _math_verify_equal(pred: str, gt: str) -> bool:
    """math-verify's verdict with its signal timeouts off (see module docstring for why)."""
    from math_verify import parse, verify

    gold = parse(f"${gt}$", parsing_timeout=None)
    target = parse(f"${pred}$", parsing_timeout=None)
    if not gold or not target:
        return False
    return bool(verify(gold, target, timeout_seconds=None))


# ----------------------------------------------------------------------------- killable timeout


def _default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


class Grader:
    """A pool of grading processes with a killable per-answer timeout (pebble ``ProcessPool``).

    Args:
        max_workers: worker processes (default: min(4, CPU count)).
        timeout_s: seconds before a worker is killed and the answer graded ``status="timeout"``.
        mp_context: multiprocessing start method. ``"fork"`` (default on POSIX) replaces a killed
            worker in milliseconds (the parent has already imported sympy/mathruler/math-verify) and
            works from scripts without an ``if __name__ == "__main__"`` guard. A heavily threaded
            parent (a server) may prefer ``"forkserver"``, which needs that guard in the main script.

    Example:
        >>> with Grader(max_workers=2, timeout_s=2.0) as g:
        ...     g.submit("0.5", "\\\\frac{1}{2}").result().correct
        True
    """

    def __init__(
        self, max_workers: int | None = None, timeout_s: float = 5.0, mp_context: str | None = "fork"
    ):
        if timeout_s is None or timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        if max_workers is not None and max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers!r}")
        if mp_context == "fork" and "fork" not in multiprocessing.get_all_start_methods():
            mp_context = None  # Windows/macOS-spawn platforms: the platform default
        self._ctx = multiprocessing.get_context(mp_context) if mp_context else None
        if mp_context == "forkserver":
            self._ctx.set_forkserver_preload(list(_PRELOAD))
        for module in _PRELOAD:  # forked workers inherit these imports: fast (re)starts
            importlib.import_module(module)
        self.timeout_s = float(timeout_s)
        self.max_workers = max_workers or _default_workers()
        self._closed = False
        self._pool = self._new_pool()

    def _new_pool(self):
        from pebble import ProcessPool

        return ProcessPool(max_workers=self.max_workers, context=self._ctx)

    def submit(
        self,
        prediction: str | None,
        ground_truth: str,
        kind: str | None = None,
        timeout_s: float | None = None,
    ) -> concurrent.futures.Future[GradeResult]:
        """Schedule one answer; the future always resolves to a :class:`GradeResult` (never raises)."""
        return self._schedule(grade_answer, (prediction, ground_truth, kind), timeout_s)

    def _schedule(self, fn, args: tuple, timeout_s: float | None = None) -> concurrent.futures.Future:
        """Run ``fn(*args)`` in a worker; timeouts and crashes become GradeResults. Tests use this hook."""
        if self._closed:
            raise RuntimeError("Grader is closed")
        out: concurrent.futures.Future[GradeResult] = concurrent.futures.Future()
        out.set_running_or_notify_cancel()
        timeout = self.timeout_s if timeout_s is None else float(timeout_s)
        try:
            inner = self._pool.schedule(fn, args=args, timeout=timeout)
        except RuntimeError:  # pebble marks a pool broken when workers cannot start; try a fresh one once
            try:
                self._pool.stop()
                self._pool = self._new_pool()
                inner = self._pool.schedule(fn, args=args, timeout=timeout)
            except Exception as err:
                out.set_result(GradeResult(False, "error", None, f"grading pool unusable: {err}"))
                return out
        inner.add_done_callback(lambda f: out.set_result(_outcome(f, timeout)))
        return out

    def grade_many(
        self, items: Iterable[tuple[str | None, str, str | None]], progress: bool = False
    ) -> list[GradeResult]:
        """Grade ``(prediction, ground_truth, kind)`` triples in parallel; results keep input order."""
        futures = [self.submit(p, g, k) for p, g, k in items]
        if progress:
            from tqdm import tqdm

            for _ in tqdm(concurrent.futures.as_completed(futures), total=len(futures), desc="grading"):
                pass
        return [f.result() for f in futures]

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        if not self._closed:
            self._closed = True
            self._pool.stop()
            self._pool.join(timeout=10)

    def __enter__(self) -> Grader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _outcome(future: concurrent.futures.Future, timeout_s: float) -> GradeResult:
    """Turn a finished pebble future into a GradeResult: value, timeout, or error."""
    from pebble import ProcessExpired

    try:
        result = future.result()
    except concurrent.futures.TimeoutError:
        return GradeResult(False, "timeout", None, f"grading exceeded {timeout_s:g}s; worker killed")
    except ProcessExpired as err:
        return GradeResult(False, "error", None, f"grading worker died (exit code {err.exitcode})")
    except Exception as err:
        return GradeResult(False, "error", None, f"{type(err).__name__}: {err}")
    if isinstance(result, GradeResult):
        return result
    return GradeResult(False, "error", None, f"grading returned {type(result).__name__}, not GradeResult")


_DEFAULT: Grader | None = None
_DEFAULT_PID: int | None = None
_DEFAULT_LOCK = threading.Lock()


def default_grader() -> Grader:
    """The process-wide Grader, created on first use (2 workers at most) and closed at exit.

    A forked child (a DataLoader worker, a Ray actor forked after first use) gets its own pool: the
    parent's pool threads do not exist in the child, and submitting there would wait forever.
    """
    global _DEFAULT, _DEFAULT_PID
    with _DEFAULT_LOCK:
        if _DEFAULT is None or _DEFAULT._closed or os.getpid() != _DEFAULT_PID:
            _DEFAULT = Grader(max_workers=min(2, _default_workers()))
            _DEFAULT_PID = os.getpid()
            atexit.register(_DEFAULT.close)
        return _DEFAULT


def grade_with_timeout(
    prediction: str | None, ground_truth: str, kind: str | None = None, timeout_s: float = 5.0
) -> GradeResult:
    """:func:`grade_answer` in the process-wide pool; returns ``status="timeout"`` after ``timeout_s``.

    Example:
        >>> grade_with_timeout("9**9**9**9", "\\\\sqrt{2}", timeout_s=1.0).status
        'timeout'
    """
    future = default_grader().submit(prediction, ground_truth, kind, timeout_s=timeout_s)
    try:  # pebble resolves every future by itself; this bound only guards against a wedged pool
        return future.result(timeout=timeout_s + _POOL_GRACE_S)
    except concurrent.futures.TimeoutError:
        return GradeResult(
            False, "timeout", None, f"grading pool did not answer within {timeout_s:g}s + grace"
        )


_POOL_GRACE_S = 60.0


def reference_grade(response: str, ground_truth: str) -> GradeResult:
    """The authors' correctness check (mathruler on the last box of the tag-normalised response) as a
    :class:`GradeResult`; module-level so the grading pool can run it."""
    from vlcal_verl.rewards_reference import normalise_tags, reference_accuracy

    correct = reference_accuracy(normalise_tags(response), str(ground_truth)) == 1.0
    return GradeResult(correct, "ok", "reference", None)


def reference_grade_with_timeout(response: str, ground_truth: str, timeout_s: float = 5.0) -> GradeResult:
    """:func:`reference_grade` in the process-wide pool, ``status="timeout"`` after ``timeout_s``."""
    future = default_grader()._schedule(reference_grade, (response, str(ground_truth)), timeout_s)
    try:
        return future.result(timeout=timeout_s + _POOL_GRACE_S)
    except concurrent.futures.TimeoutError:
        return GradeResult(
            False, "timeout", None, f"grading pool did not answer within {timeout_s:g}s + grace"
        )
