"""Graceful shutdown: on SIGTERM, stop taking work, answer what is in flight, exit within a grace period.

uvicorn does most of it (``timeout_graceful_shutdown``): on SIGTERM/SIGINT it closes the listening
socket (new connections are refused), closes idle keep-alive connections, and waits for in-flight
requests. What it does not do is answer a request still running when that wait runs out: it cancels the
task and the client sees the connection drop without a response (a 200-item batch of slow sympy answers
takes longer than any sensible grace). So :class:`DrainingServer` also tells the app when shutdown starts
(:meth:`Drain.begin`), and then:

* a request that arrives on an open connection, and ``/readyz``, get 503 + Retry-After ("shutting down"),
  so load balancers and clients go elsewhere;
* a request already scoring keeps scoring; if it is not done :func:`drain_margin` (2 s) before the grace
  period ends it is answered 503 + Retry-After instead (its work is discarded: a retry goes to another
  replica or the restarted server), so every in-flight request gets a complete HTTP answer;
* results that hold items whose grading worker died while draining (the signal reached the whole process
  group) are answered 503 + Retry-After too, never as those items graded incorrect;
* then uvicorn's own wait ends, the lifespan closes the grading pool, and the process exits.

The grace period is the ``shutdown_grace_s`` setting; keep it below the orchestrator's kill timeout
(Kubernetes' ``terminationGracePeriodSeconds`` is 30 s by default, ``docker stop`` waits 10 s).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

from reward_server.limits import ApiError

T = TypeVar("T")


def drain_margin(grace_s: float) -> float:
    """Seconds before the grace period ends at which unfinished requests are answered 503: 2 s (half the
    grace when that is shorter), time to write the answers, close the grading pool (0.75 s measured with
    200 items queued on 2 workers) and exit.

    >>> drain_margin(20.0), drain_margin(3.0)
    (2.0, 1.5)
    """
    return min(2.0, grace_s / 2)


class Drain:
    """Shutdown state shared by the routes: not started, then draining until a deadline."""

    def __init__(self, grace_s: float, retry_after_s: int):
        self.grace_s = grace_s
        self.retry_after_s = retry_after_s
        self.started_at: float | None = None
        self._expired: asyncio.Event | None = None
        self._timer: asyncio.TimerHandle | None = None

    @property
    def draining(self) -> bool:
        return self.started_at is not None

    def mark(self) -> None:
        """Note that shutdown started (from the signal handler: only sets a time, so it is safe there)."""
        if self.started_at is None:
            self.started_at = time.monotonic()

    def begin(self) -> None:
        """Start draining (idempotent; call on the event loop): in-flight work is cut off at the deadline,
        counted from :meth:`mark`."""
        self.mark()
        if self._timer is not None:
            return
        assert self.started_at is not None
        deadline = self.started_at + self.grace_s - drain_margin(self.grace_s)
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(max(0.0, deadline - time.monotonic()), self._event().set)

    def _event(self) -> asyncio.Event:
        if self._expired is None:
            self._expired = asyncio.Event()
        return self._expired

    def error(self, what: str) -> ApiError:
        msg = f"server shutting down: {what}; retry (another replica, or this one once restarted)"
        return ApiError(503, [], msg, "shutting_down", {"Retry-After": str(self.retry_after_s)})

    def refuse_if_draining(self) -> None:
        if self.draining:
            raise self.error("not taking new requests")

    async def finish(self, work: Awaitable[T]) -> T:
        """``await work``, unless draining reaches its deadline first: then cancel it and raise 503."""
        task = asyncio.ensure_future(work)
        expired = asyncio.ensure_future(self._event().wait())
        try:
            await asyncio.wait({task, expired}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # uvicorn gave up on the request: stop its work too
            task.cancel()
            raise
        finally:
            expired.cancel()
        if task.done():
            return task.result()
        task.cancel()
        raise self.error(f"this request was not finished within the {self.grace_s:g} s grace period")

    def refuse_worker_errors(self, statuses: list[str]) -> None:
        """503 instead of results with ``error`` items while draining: a SIGTERM sent to the whole process
        group (a terminal, ``kill -TERM -PGID``, systemd's default KillMode) also kills the grading workers,
        and their items would come back graded incorrect — a wrong reward — rather than retried."""
        if self.draining and "error" in statuses:
            raise self.error("grading workers were stopped by the shutdown signal")


def draining_server(config: Any, drain: Drain) -> Any:
    """A ``uvicorn.Server`` that marks ``drain`` in its signal handler (before a grading worker killed by
    the same signal can report back) and starts it when its shutdown starts (the next 0.1 s tick)."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            drain.mark()
            super().handle_exit(sig, frame)

        async def shutdown(self, sockets: Any = None) -> None:
            drain.begin()
            await super().shutdown(sockets)

    return DrainingServer(config)
