"""Scoring off the event loop: cheap parsing in-process, grading in a killable process pool.

Per item: the response is parsed on the event loop (linear-time, microseconds), the extracted answer is
graded by :class:`vlcal_verl.grading.Grader` (a pebble process pool: a hung sympy call is killed at the
per-item timeout and its worker replaced; a worker that dies fails only its own item), and the reward is
assembled by :func:`vlcal_verl.rewards.score_response` with that grade — the very function
``compute_score`` uses in-process, so both paths give the same numbers.

The pool is awaited through ``asyncio.wrap_future``; nothing here blocks the loop. Admission control
(``admit``) bounds the items in flight: past ``max_inflight`` a request is refused with 503 instead of
queueing without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import psutil

from reward_server import schemas
from reward_server.limits import ApiError
from reward_server.metrics import ServerMetrics
from reward_server.settings import ServerSettings
from vlcal_verl import grading, protocol, rewards
from vlcal_verl.config import RewardConfig

_WATCH_PERIOD_S = 1.0


def item_status(components: dict[str, Any]) -> str:
    """ok | timeout | parse_error from a reward dict (error is decided by the caller)."""
    if components.get("grading_status") == "timeout":
        return "timeout"
    if components.get("grading_status") == "error":
        return "error"
    if not components.get("parse_ok"):
        return "parse_error"
    return "ok"


class ScoringService:
    """Owns the grading pool; scores batches of :class:`schemas.ScoreItem`."""

    def __init__(self, settings: ServerSettings, metrics: ServerMetrics):
        self.settings = settings
        self.metrics = metrics
        self.component_keys: tuple[str, ...] = tuple(rewards.REWARD_COMPONENT_KEYS)
        self.ready = False
        self.inflight = 0
        self._grader: grading.Grader | None = None
        self._warm_error: str | None = None
        self._known_workers: set[int] = set()
        self._watch: asyncio.Task | None = None

    # ---- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        # forkserver: workers (and their replacements after a kill) are forked from a clean, single-threaded
        # server process, never from this one with its event loop and executor threads
        self._grader = grading.Grader(
            max_workers=self.settings.workers, timeout_s=self.settings.timeout, mp_context="forkserver"
        )
        self._grader.__enter__()

    async def warm(self, also: Callable[[], None] | None = None) -> None:
        """Grade a small math item in every worker (lazy parser set-up happens here, not in the first
        real batch) while ``also`` (e.g. the torch import of /v1/visual-labels) runs in a thread;
        /readyz answers 200 once all grades came back correct and ``also`` returned."""
        assert self._grader is not None, "start() first"
        probes = [self._grader.submit("\\frac{1}{2}", "0.5") for _ in range(2 * self.settings.workers)]
        side = asyncio.create_task(asyncio.to_thread(also)) if also is not None else None
        try:
            results = await asyncio.gather(*(asyncio.wrap_future(f) for f in probes))
        except Exception as err:
            self._warm_error = f"warm-up grade raised {type(err).__name__}: {err}"
            return
        if side is not None:
            try:
                await side
            except Exception as err:
                name = getattr(also, "__qualname__", repr(also))
                self._warm_error = f"warm-up of {name} raised {type(err).__name__}: {err}"
                return
        wrong = [r for r in results if not r.correct]
        if wrong:
            self._warm_error = f"warm-up grade of '\\frac{{1}}{{2}}' vs '0.5' came back {wrong[0]}"
            return
        self._known_workers = self._worker_pids()
        self.ready = True
        self._watch = asyncio.create_task(self._watch_workers())

    def not_ready_reason(self) -> str:
        return self._warm_error or "warming up (grading pool, torch)"

    def close(self) -> None:
        self.ready = False
        if self._watch is not None:
            self._watch.cancel()
        if self._grader is not None:
            self._grader.__exit__(None, None, None)
            self._grader = None

    @staticmethod
    def _worker_pids() -> set[int]:
        try:
            return {p.pid for p in psutil.Process().children(recursive=True)}
        except psutil.Error:
            return set()

    async def _watch_workers(self) -> None:
        """Count pool restarts: every child process first seen after warm-up replaced one that died."""
        while True:
            await asyncio.sleep(_WATCH_PERIOD_S)
            now = self._worker_pids()
            new = now - self._known_workers
            if new:
                self.metrics.pool_restarts.inc(len(new))
            self._known_workers |= now

    # ---- admission ------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def admit(self, n: int) -> AsyncIterator[None]:
        """Reserve ``n`` in-flight items or raise 503 (Retry-After) when over ``max_inflight``."""
        if self.inflight + n > self.settings.max_inflight:
            self.metrics.rejected.inc()
            msg = (
                f"server busy: {self.inflight} items in flight, {n} more would exceed "
                f"max_inflight={self.settings.max_inflight}; retry later"
            )
            raise ApiError(
                503, ["body", "items"], msg, "overloaded", {"Retry-After": str(self.settings.retry_after_s)}
            )
        if not self.ready:
            raise ApiError(
                503, [], f"not ready: {self.not_ready_reason()}", "not_ready",
                {"Retry-After": str(self.settings.retry_after_s)},
            )  # fmt: skip
        self.inflight += n
        self.metrics.inflight.set(self.inflight)
        try:
            yield
        finally:
            self.inflight -= n
            self.metrics.inflight.set(self.inflight)

    # ---- scoring --------------------------------------------------------------------------------

    async def score(self, items: list[schemas.ScoreItem], cfg: RewardConfig) -> list[schemas.ScoreResult]:
        return list(await asyncio.gather(*(self._score_one(item, cfg) for item in items)))

    async def _grade(self, item: schemas.ScoreItem, cfg: RewardConfig) -> Any:
        """Grade the response's boxed answer in the pool, exactly as ``rewards.compute_score`` would."""
        assert self._grader is not None
        answer = protocol.parse_response(item.response, cfg.protocol).answer
        kind = rewards.answer_kind(item.extra_info)
        if answer is None:  # nothing to grade: no_answer, decided in-process without a round trip
            return grading.grade_answer(None, item.ground_truth, kind=kind)
        return await asyncio.wrap_future(self._grader.submit(answer, item.ground_truth, kind=kind))

    async def _score_one(self, item: schemas.ScoreItem, cfg: RewardConfig) -> schemas.ScoreResult:
        start = time.perf_counter()
        try:
            if cfg.reference_parity:  # the authors' grading (mathruler in-process), as compute_score does
                out = await asyncio.to_thread(
                    rewards.score_response, item.response, item.ground_truth, item.data_source, config=cfg
                )
            else:
                grade = await self._grade(item, cfg)
                out = rewards.score_response(
                    item.response, item.ground_truth, item.data_source, config=cfg, grade=grade
                )
        except Exception as err:  # one bad item never fails the batch
            self.metrics.items.labels(status="error").inc()
            return schemas.ScoreResult(
                uid=item.uid,
                score=None,
                status="error",
                components={k: None for k in self.component_keys},
                latency_ms=(time.perf_counter() - start) * 1e3,
                error=f"{type(err).__name__}: {err}"[:500],
            )
        components = {k: out.get(k) for k in self.component_keys if k != "score"}
        status = item_status(components)
        self.metrics.items.labels(status=status).inc()
        if status == "timeout":
            self.metrics.timeouts.inc()
        if not components.get("parse_ok"):
            self.metrics.parse_failures.inc()
        return schemas.ScoreResult(
            uid=item.uid,
            score=float(out["score"]),
            status=status,
            components=components,
            latency_ms=(time.perf_counter() - start) * 1e3,
        )
