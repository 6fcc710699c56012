"""The reward server's HTTP client, and how it meets a faulty server.

A training step must survive a reward server that restarts (a crash, a rolling update) and must fail —
never score 0 — when it is gone. So every attempt has a finite timeout; 5xx answers (503 overload,
"not ready" and "shutting down", honouring Retry-After), connection errors and timeouts are retried with
capped exponential backoff and jitter, at most ``max_retries`` times, each retry logged (URL, attempt,
reason, delay) and counted (:class:`ClientStats`, and per result); then the call raises
:class:`RewardServerError`, one line naming the URL and the budget spent. 4xx answers are the caller's
fault and raise at once. An item the server answered with status ``error`` (its grading worker died, so
its "graded incorrect" is not a grade) is re-sent up to ``item_retries`` times and raises if it still
errs. httpx's own ``retries=`` retries failed connects only (not 5xx, dropped connections or
Retry-After), hence the loop here. :mod:`reward_server.client` is the verl-facing part.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

ENV_URL = "VLCAL_REWARD_SERVER_URL"
DEFAULT_URL = "http://127.0.0.1:8000"
log = logging.getLogger(__name__)


class RewardServerError(RuntimeError):
    """The server refused a request (4xx), kept failing (5xx/connection) or could not score an item."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ClientOptions:
    """How the client talks to the server; every field can come from verl's ``reward_kwargs``."""

    server_url: str = field(default_factory=lambda: os.environ.get(ENV_URL, DEFAULT_URL))
    """Base URL of the reward server (env ``VLCAL_REWARD_SERVER_URL``)."""
    timeout_s: float = 120.0
    """Per-attempt HTTP timeout (a batch waits for its slowest grading, up to the server's timeout);
    connecting gets at most 10 s of it."""
    max_retries: int = 10
    """Retries after the first attempt, on 5xx / connection errors / timeouts only. With the default
    backoff the retries wait 45-90 s in all: a restart of the server (~15 s to ready here) is ridden
    out, a server gone for good fails the step after that."""
    backoff_s: float = 0.5
    """First backoff; doubles per retry, times a jitter in [0.5, 1], capped at ``backoff_max_s``."""
    backoff_max_s: float = 15.0
    """Longest wait between attempts; also caps a server's Retry-After."""
    item_retries: int = 2
    """Re-sends of an item answered with status ``error`` (a grading worker died) before raising."""
    batch_window_ms: float = 5.0
    """How long compute_score waits for more concurrent calls before sending a batch."""
    max_batch: int = 256
    """Items per /v1/score request."""
    w_brier: float | None = None
    """Per-request reward weights and protocol (None = the server's defaults), as in
    ``vlcal_verl.rewards.compute_score``'s reward_kwargs."""
    w_fmt: float | None = None
    w_vis: float | None = None
    protocol: str | None = None
    reference_parity: bool | None = None
    """True: the authors' decouple reward (as ``compute_score(..., reference_parity=True)``)."""

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> ClientOptions:
        """Options from verl's ``reward_kwargs``; verl's own extra keys are ignored, typos are an error."""
        unknown = set(kwargs) - set(cls.__dataclass_fields__) - _VERL_EXTRA_KWARGS
        if unknown:
            raise ValueError(
                f"unknown reward_kwargs {sorted(unknown)} for reward_server.client; "
                f"accepted: {sorted(cls.__dataclass_fields__)}"
            )
        return cls(**{k: v for k, v in kwargs.items() if k in cls.__dataclass_fields__ and v is not None})

    def weights(self) -> dict[str, Any] | None:
        chosen = {k: getattr(self, k) for k in ("w_brier", "w_fmt", "w_vis", "protocol", "reference_parity")}
        chosen = {k: v for k, v in chosen.items() if v is not None}
        return chosen or None


TRANSPORT_OPTIONS = ("timeout_s", "max_retries", "backoff_s", "backoff_max_s", "item_retries",
                     "batch_window_ms", "max_batch")  # fmt: skip
"""The options that say how to reach the server (not what to score): a trainer passes them through."""

# keyword arguments verl's naive reward manager adds when a reward model is configured (not ours)
_VERL_EXTRA_KWARGS = frozenset({"reward_router_address", "reward_model_tokenizer"})


@dataclass
class ClientStats:
    """What one client met so far (per process: verl's reward workers each have their own)."""

    requests: int = 0
    retries: int = 0
    item_retries: int = 0
    failures: int = 0


def retry_delay(attempt: int, options: ClientOptions, retry_after: str | None = None) -> float:
    """Seconds to wait before retry ``attempt`` (0-based): capped 2^attempt backoff with jitter,
    at least the server's Retry-After (capped at ``backoff_max_s``) when it sent one."""
    delay = min(options.backoff_max_s, options.backoff_s * (2**attempt)) * random.uniform(0.5, 1.0)
    if retry_after is not None:
        with contextlib.suppress(ValueError):  # an HTTP-date Retry-After: keep our own backoff
            delay = max(delay, min(float(retry_after), options.backoff_max_s))
    return delay


def _one_line(text: str, limit: int = 300) -> str:
    return " ".join(str(text).split())[:limit]


def _error_message(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail")
    except ValueError:
        return _one_line(response.text)
    if isinstance(detail, list):
        parts = [(".".join(map(str, d.get("loc") or [])), d.get("msg")) for d in detail]
        return _one_line("; ".join(f"{loc}: {msg}" if loc else str(msg) for loc, msg in parts))
    return _one_line(str(detail))


def _reason(err: Exception) -> str:
    return _one_line(f"{type(err).__name__}: {err}" if str(err) else type(err).__name__)


def give_up_message(url: str, attempts: int, elapsed_s: float, options: ClientOptions, last: str) -> str:
    """The one line a step fails with when the server stays unreachable or keeps answering 5xx."""
    return (
        f"reward server {url} failed: gave up after {attempts} attempts in {elapsed_s:.1f} s "
        f"(max_retries={options.max_retries}, backoff {options.backoff_s:g}-{options.backoff_max_s:g} s, "
        f"timeout_s={options.timeout_s:g}); last error: {last}"
    )


def _errored(result: dict[str, Any]) -> bool:
    """An item the server could not grade: its score (if any) is "graded incorrect", not a grade."""
    return result.get("status") == "error" or result.get("score") is None


class RewardClient:
    """Async client of one reward server; reuse one per event loop (it holds a connection pool)."""

    def __init__(
        self, options: ClientOptions | None = None, transport: httpx.AsyncBaseTransport | None = None
    ):
        self.options = options or ClientOptions()
        self.stats = ClientStats()
        self._http = httpx.AsyncClient(
            base_url=self.options.server_url,
            timeout=httpx.Timeout(self.options.timeout_s, connect=min(10.0, self.options.timeout_s)),
            transport=transport,
        )

    async def post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        """POST JSON with bounded retries on 5xx / transport errors; raise RewardServerError on 4xx."""
        return (await self._post(path, payload))[0]

    async def _post(self, path: str, payload: dict[str, Any]) -> tuple[dict[str, Any], int]:
        """(JSON body, retries it took); raises RewardServerError at once on 4xx, after the budget else."""
        url, opts = f"{self.options.server_url}{path}", self.options
        start, last = time.monotonic(), ""
        self.stats.requests += 1
        for attempt in range(opts.max_retries + 1):
            retry_after = None
            try:
                response = await self._http.post(path, json=payload)
            except httpx.TransportError as err:  # connect/read errors, dropped connections, timeouts
                last = _reason(err)
            else:
                if response.status_code < 400:
                    return response.json(), attempt
                last = f"HTTP {response.status_code}: {_error_message(response)}"
                if response.status_code < 500:
                    raise RewardServerError(f"POST {url} -> {last}", response.status_code)
                retry_after = response.headers.get("retry-after")
            if attempt == opts.max_retries:
                break
            delay = retry_delay(attempt, opts, retry_after)
            self._note_retry(url, attempt, last, delay, retry_after)
            await asyncio.sleep(delay)
        self.stats.failures += 1
        raise RewardServerError(
            give_up_message(url, opts.max_retries + 1, time.monotonic() - start, opts, last)
        )

    def _note_retry(self, url: str, attempt: int, reason: str, delay: float, retry_after: str | None) -> None:
        self.stats.retries += 1
        after = f", Retry-After {retry_after}" if retry_after is not None else ""
        log.warning(
            "reward server %s: attempt %d/%d failed (%s%s); retrying in %.2f s",
            url, attempt + 1, self.options.max_retries + 1, reason, after, delay,
            extra={"reward_client": {"url": url, "attempt": attempt + 1, "delay_s": delay,
                                     "retry_after": retry_after, "reason": reason}},
        )  # fmt: skip

    async def _score_once(
        self, items: list[dict[str, Any]], weights: dict[str, Any] | None
    ) -> tuple[list, int]:
        payload: dict[str, Any] = {"items": items}
        if weights:
            payload["weights"] = weights
        body, retries = await self._post("/v1/score", payload)
        results = body["results"]
        if len(results) != len(items):
            raise RewardServerError(
                f"reward server {self.options.server_url} returned {len(results)} results for {len(items)} items"
            )
        for result in results:
            result["client_retries"], result["client_item_retries"] = 0, 0
        if results:
            results[0]["client_retries"] = retries
        return results, retries

    async def score(
        self, items: list[dict[str, Any]], weights: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        """Score items ({uid, data_source, response, ground_truth, extra_info}) → the server's results,
        each with ``client_retries`` / ``client_item_retries`` (:data:`reward_server.client.CLIENT_METRIC_KEYS`).

        Items answered with status ``error`` are re-sent (alone) up to ``item_retries`` times; raises
        RewardServerError if any still errs, rather than return a reward that is not a grade."""
        results, _ = await self._score_once(items, weights)
        pending = [i for i, r in enumerate(results) if _errored(r)]
        for round_ in range(self.options.item_retries):
            if not pending:
                break
            self.stats.item_retries += len(pending)
            delay = retry_delay(round_, self.options)
            log.warning(
                "reward server %s: %d of %d items answered status error (uid %s: %s); re-sending them "
                "(%d/%d) in %.2f s", self.options.server_url, len(pending), len(items),
                results[pending[0]].get("uid"), _item_error(results[pending[0]]), round_ + 1,
                self.options.item_retries, delay,
            )  # fmt: skip
            await asyncio.sleep(delay)
            again, retries = await self._score_once([items[i] for i in pending], weights)
            for i, result in zip(pending, again, strict=True):
                result["client_item_retries"] = round_ + 1
                results[i] = result
            results[pending[0]]["client_retries"] = retries
            pending = [i for i in pending if _errored(results[i])]
        if pending:
            first = results[pending[0]]
            raise RewardServerError(
                f"reward server {self.options.server_url} failed: {len(pending)} of {len(items)} items still "
                f"answered status error after {self.options.item_retries} re-sends (item_retries="
                f"{self.options.item_retries}); first: uid {first.get('uid')}: {_item_error(first)}"
            )
        return results

    async def visual_labels(self, samples: list[dict[str, Any]], **options: Any) -> list[dict[str, Any]]:
        """S̃_vis for a whole batch: samples with kl_mean/entropy_mean or kl/entropy(/span)."""
        return (await self.post("/v1/visual-labels", {"samples": samples, **options}))["labels"]

    async def aclose(self) -> None:
        await self._http.aclose()


def _item_error(result: dict[str, Any]) -> str:
    reason = result.get("error") or "grading_status=" + str(
        (result.get("components") or {}).get("grading_status")
    )
    return _one_line(reason, 200)
