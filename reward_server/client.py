"""verl 0.9.1 ``custom_reward_function`` that scores through the reward server.

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

Faults (:mod:`reward_server.http_client`): bounded, logged retries with backoff, then one
:class:`RewardServerError` line naming the URL — which fails verl's step — never a silent 0. Each reward
dict carries the retries its request needed (:data:`CLIENT_METRIC_KEYS`); the trainer sums them into
``reward_client/*`` step metrics with :func:`step_metrics`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import weakref
from typing import Any

from reward_server.http_client import (
    DEFAULT_URL,
    ENV_URL,
    TRANSPORT_OPTIONS,
    ClientOptions,
    ClientStats,
    RewardClient,
    RewardServerError,
    retry_delay,
)

__all__ = [
    "CLIENT_METRIC_KEYS", "DEFAULT_URL", "ENV_URL", "TRANSPORT_OPTIONS", "ClientOptions", "ClientStats",
    "RewardClient", "RewardServerError", "compute_score", "compute_score_batch", "compute_score_batch_async",
    "json_safe", "make_item", "retry_delay", "step_metrics", "to_reward_dict",
]  # fmt: skip

CLIENT_METRIC_KEYS = ("reward_client_retries", "reward_client_item_retries")
"""Extra keys of every reward dict: the retries of the request that scored the item, counted on the
request's first item only (so a step's sum is its number of retried requests' attempts), and how many
times this item was re-sent because the server answered it with status ``error``."""


def to_reward_dict(result: dict[str, Any]) -> dict[str, Any]:
    """A server result → what verl's reward manager expects: {"score": R, <component keys>, <client keys>}."""
    if result.get("score") is None:  # a grading error still has a score (graded incorrect)
        raise RewardServerError(
            f"reward server could not score uid={result.get('uid')}: {result.get('error')}"
        )
    return {
        "score": float(result["score"]),
        **result["components"],
        "reward_client_retries": int(result.get("client_retries", 0)),
        "reward_client_item_retries": int(result.get("client_item_retries", 0)),
    }


def step_metrics(infos: list[dict[str, Any]]) -> dict[str, float]:
    """``reward_client/retries`` and ``reward_client/item_retries`` of one training step, summed over its
    samples' reward dicts (empty when the reward is computed in-process: no sample has the keys)."""
    if not any(key in info for info in infos for key in CLIENT_METRIC_KEYS):
        return {}
    return {
        f"reward_client/{key.removeprefix('reward_client_')}": float(sum(int(i.get(key) or 0) for i in infos))
        for key in CLIENT_METRIC_KEYS
    }


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
    return await _score_chunks(_batcher(options).client, items, options)


async def _score_chunks(client: RewardClient, items: list[dict[str, Any]], options: ClientOptions) -> list:
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
    """Synchronous batch variant (the ``BatchRewardManager`` signature of older verl, scripts, notebooks):
    the async client on an event loop of its own thread, so it works under a running loop too and shares
    the retry and item-error handling."""
    options = ClientOptions.from_kwargs(kwargs)
    items = _batch_items(data_sources, solution_strs, ground_truths, extra_infos)

    async def run() -> list[dict[str, Any]]:
        client = RewardClient(options)
        try:
            return await _score_chunks(client, items, options)
        finally:
            await client.aclose()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, run()).result()
