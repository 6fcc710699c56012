"""verl 0.9.1 ``custom_reward_function`` that scores through the reward server, and a plain client.

verl's reward loop (``verl/experimental/reward_loop/reward_manager/naive.py``) calls
``compute_score(data_source=, solution_str=, ground_truth=, extra_info=, **reward_kwargs)`` once per
sample, many at a time on one event loop, and awaits it when it is a coroutine function
(``inspect.iscoroutinefunction``). So :func:`compute_score` is ``async`` and *coalesces* the calls that
arrive together on a loop into one ``POST /v1/score`` (up to ``max_batch`` items, waiting at most
``batch_window_ms``): one HTTP round trip per batch, not per sample.

verl config (Hydra overrides)::

    reward.custom_reward_function.path=pkg://reward_server.client
    reward.custom_reward_function.name=compute_score
    +reward.custom_reward_function.reward_kwargs.server_url=http://rm-host:8000

(or export ``VLCAL_REWARD_SERVER_URL`` in the Ray workers' environment instead of ``server_url``).

Every call has a finite timeout; 5xx answers (503 overload included, honouring Retry-After),
connection errors and timeouts are retried with capped exponential backoff and jitter, a bounded number
of times; 4xx answers are the caller's fault and raise :class:`RewardServerError` at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import httpx

ENV_URL = "VLCAL_REWARD_SERVER_URL"
DEFAULT_URL = "http://127.0.0.1:8000"


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
    """Per-attempt HTTP timeout (a batch waits for its slowest grading, up to the server's timeout)."""
    max_retries: int = 5
    """Retries after the first attempt, on 5xx / connection errors / timeouts only."""
    backoff_s: float = 0.5
    """First backoff; doubles per retry, with jitter, capped at ``backoff_max_s``."""
    backoff_max_s: float = 10.0
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


# keyword arguments verl's naive reward manager adds when a reward model is configured (not ours)
_VERL_EXTRA_KWARGS = frozenset({"reward_router_address", "reward_model_tokenizer"})


def retry_delay(attempt: int, options: ClientOptions, retry_after: str | None = None) -> float:
    """Seconds to wait before retry ``attempt`` (0-based): capped 2^attempt backoff with jitter,
    at least the server's Retry-After when it sent one."""
    delay = min(options.backoff_max_s, options.backoff_s * (2**attempt)) * random.uniform(0.5, 1.0)
    if retry_after is not None:
        with contextlib.suppress(ValueError):  # an HTTP-date Retry-After: keep our own backoff
            delay = max(delay, min(float(retry_after), options.backoff_max_s))
    return delay


def _error_message(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail")
    except ValueError:
        return response.text[:500]
    if isinstance(detail, list):
        return "; ".join(f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}" for d in detail)
    return str(detail)


def _check(response: httpx.Response, url: str) -> dict[str, Any] | RewardServerError:
    """The JSON body on success; raise on 4xx; return (not raise) a retryable error on 5xx."""
    if response.status_code < 400:
        return response.json()
    err = RewardServerError(
        f"POST {url} -> HTTP {response.status_code}: {_error_message(response)}", response.status_code
    )
    if response.status_code < 500:
        raise err
    return err


class RewardClient:
    """Async client of one reward server; reuse one per event loop (it holds a connection pool)."""

    def __init__(
        self, options: ClientOptions | None = None, transport: httpx.AsyncBaseTransport | None = None
    ):
        self.options = options or ClientOptions()
        self._http = httpx.AsyncClient(
            base_url=self.options.server_url,
            timeout=httpx.Timeout(self.options.timeout_s, connect=min(10.0, self.options.timeout_s)),
            transport=transport,
        )

    async def post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        """POST JSON with bounded retries on 5xx / transport errors; raise RewardServerError on 4xx."""
        last: Exception | None = None
        for attempt in range(self.options.max_retries + 1):
            retry_after = None
            try:
                response = await self._http.post(path, json=payload)
            except httpx.TransportError as err:  # connect/read errors and timeouts
                last = err
            else:
                result = _check(response, f"{self.options.server_url}{path}")
                if not isinstance(result, RewardServerError):
                    return result
                last, retry_after = result, response.headers.get("retry-after")
            if attempt < self.options.max_retries:
                await asyncio.sleep(retry_delay(attempt, self.options, retry_after))
        raise RewardServerError(
            f"POST {self.options.server_url}{path} failed after {self.options.max_retries + 1} attempts: {last!r}"
        ) from last

    async def score(
        self, items: list[dict[str, Any]], weights: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        """Score items ({uid, data_source, response, ground_truth, extra_info}) → the server's results."""
        payload: dict[str, Any] = {"items": items}
        if weights:
            payload["weights"] = weights
        return (await self.post("/v1/score", payload))["results"]

    async def visual_labels(self, samples: list[dict[str, Any]], **options: Any) -> list[dict[str, Any]]:
        """S̃_vis for a whole batch: samples with kl_mean/entropy_mean or kl/entropy(/span)."""
        return (await self.post("/v1/visual-labels", {"samples": samples, **options}))["labels"]

    async def aclose(self) -> None:
        await self._http.aclose()


def to_reward_dict(result: dict[str, Any]) -> dict[str, Any]:
    """A server result → what verl's reward manager expects: {"score": R, <component keys>}."""
    if result.get("score") is None:  # a grading error still has a score (graded incorrect)
        raise RewardServerError(
            f"reward server could not score uid={result.get('uid')}: {result.get('error')}"
        )
    return {"score": float(result["score"]), **result["components"]}


def json_safe(value: Any, depth: int = 0) -> Any:
    """verl's extra_info holds numpy scalars/arrays and nested dicts: make it JSON (strings as a last resort)."""
    if depth > 8:
        return str(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, dict):
        return {str(k): json_safe(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [json_safe(v, depth + 1) for v in value]
    if hasattr(value, "tolist"):  # numpy arrays and scalars, torch tensors
        return json_safe(value.tolist(), depth + 1)
    return str(value)


def make_item(
    uid: Any, data_source: Any, solution_str: str, ground_truth: Any, extra_info: Any
) -> dict[str, Any]:
    item = {
        "uid": str(uid),
        "data_source": "" if data_source is None else str(data_source),
        "response": solution_str,
        "ground_truth": json_safe(ground_truth),
    }
    if extra_info:
        item["extra_info"] = json_safe(extra_info)
    return item


# ---- per-event-loop batching for verl's per-sample calls -------------------------------------------


class _Batcher:
    """Coalesces concurrent compute_score calls on one event loop into /v1/score batches."""

    def __init__(self, options: ClientOptions):
        self.client = RewardClient(options)
        self.options = options
        self.pending: list[tuple[dict[str, Any], asyncio.Future]] = []
        self.flush_handle: asyncio.TimerHandle | None = None
        self.counter = 0

    def submit(self, item: dict[str, Any]) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.counter += 1
        item["uid"] = f"{item['uid']}#{self.counter}"  # unique within the batch
        self.pending.append((item, future))
        if len(self.pending) >= self.options.max_batch:
            self._flush()
        elif self.flush_handle is None:
            self.flush_handle = loop.call_later(self.options.batch_window_ms / 1e3, self._flush)
        return future

    def _flush(self) -> None:
        if self.flush_handle is not None:
            self.flush_handle.cancel()
            self.flush_handle = None
        batch, self.pending = self.pending, []
        if batch:
            task = asyncio.get_running_loop().create_task(self._send(batch))
            _BACKGROUND.add(task)
            task.add_done_callback(_BACKGROUND.discard)

    async def _send(self, batch: list[tuple[dict[str, Any], asyncio.Future]]) -> None:
        try:
            results = await self.client.score([item for item, _ in batch], self.options.weights())
            if len(results) != len(batch):
                raise RewardServerError(f"server returned {len(results)} results for {len(batch)} items")
        except Exception as err:  # every waiting call gets the error, none hangs
            for _, future in batch:
                if not future.done():
                    future.set_exception(err)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)


_BACKGROUND: set[asyncio.Task] = set()
_BATCHERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _batcher(options: ClientOptions) -> _Batcher:
    per_loop = _BATCHERS.setdefault(asyncio.get_running_loop(), {})
    if options not in per_loop:
        per_loop[options] = _Batcher(options)
    return per_loop[options]


async def compute_score(
    data_source: Any,
    solution_str: str,
    ground_truth: Any,
    extra_info: dict[str, Any] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """verl ``custom_reward_function``: {"score": R, accuracy, format, brier, confidence, ...} from the server.

    ``kwargs`` may carry :class:`ClientOptions` fields (``server_url``, ``timeout_s``, ``max_retries``,
    ...) and the reward weights from ``reward.custom_reward_function.reward_kwargs``; verl's own extra
    keys are ignored, unknown keys raise ValueError. Raises RewardServerError when the server refuses
    the request (4xx), keeps failing after the retries, or cannot score this item.
    """
    options = ClientOptions.from_kwargs(kwargs)
    uid = (extra_info or {}).get("index", "item") if isinstance(extra_info, dict) else "item"
    item = make_item(uid, data_source, solution_str, ground_truth, extra_info)
    result = await _batcher(options).submit(item)
    return to_reward_dict(result)


def _batch_items(
    data_sources: list[Any],
    solution_strs: list[str],
    ground_truths: list[Any],
    extra_infos: list[dict[str, Any] | None] | None,
) -> list[dict[str, Any]]:
    """The /v1/score items of a batch call (uid = position in the batch)."""
    extra_infos = extra_infos or [None] * len(solution_strs)
    rows = zip(data_sources, solution_strs, ground_truths, extra_infos, strict=True)
    return [make_item(i, ds, s, gt, ei) for i, (ds, s, gt, ei) in enumerate(rows)]


async def compute_score_batch_async(
    data_sources: list[Any],
    solution_strs: list[str],
    ground_truths: list[Any],
    extra_infos: list[dict[str, Any] | None] | None = None,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """Score a whole batch in ``max_batch``-sized requests (concurrently); same dicts as compute_score."""
    options = ClientOptions.from_kwargs(kwargs)
    items = _batch_items(data_sources, solution_strs, ground_truths, extra_infos)
    client = _batcher(options).client
    chunks = [items[i : i + options.max_batch] for i in range(0, len(items), options.max_batch)]
    results = await asyncio.gather(*(client.score(chunk, options.weights()) for chunk in chunks))
    return [to_reward_dict(r) for chunk in results for r in chunk]


def compute_score_batch(
    data_sources: list[Any],
    solution_strs: list[str],
    ground_truths: list[Any],
    extra_infos: list[dict[str, Any] | None] | None = None,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """Synchronous batch variant (the ``BatchRewardManager`` signature of older verl, scripts, notebooks)."""
    options = ClientOptions.from_kwargs(kwargs)
    items = _batch_items(data_sources, solution_strs, ground_truths, extra_infos)
    out: list[dict[str, Any]] = []
    with httpx.Client(base_url=options.server_url, timeout=options.timeout_s) as http:
        for i in range(0, len(items), options.max_batch):
            payload: dict[str, Any] = {"items": items[i : i + options.max_batch]}
            if options.weights():
                payload["weights"] = options.weights()
            out.extend(to_reward_dict(r) for r in _post_sync(http, "/v1/score", payload, options)["results"])
    return out


def _post_sync(
    http: httpx.Client, path: str, payload: dict[str, Any], options: ClientOptions
) -> dict[str, Any]:
    last: Exception | None = None
    for attempt in range(options.max_retries + 1):
        retry_after = None
        try:
            response = http.post(path, json=payload)
        except httpx.TransportError as err:
            last = err
        else:
            result = _check(response, f"{options.server_url}{path}")
            if not isinstance(result, RewardServerError):
                return result
            last, retry_after = result, response.headers.get("retry-after")
        if attempt < options.max_retries:
            time.sleep(retry_delay(attempt, options, retry_after))  # sync code: a blocking sleep is right
    raise RewardServerError(
        f"POST {options.server_url}{path} failed after {options.max_retries + 1} attempts: {last!r}"
    ) from last
