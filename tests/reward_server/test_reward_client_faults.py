"""The client against a faulty *real* reward server (``python -m reward_server`` on 127.0.0.1): a server
killed and restarted between two calls is ridden out (retries counted and logged), a server gone for
good fails in one line naming the URL within the retry budget, a graceful shutdown's 503 + Retry-After
is retried no sooner than the server asked, and an item whose grading worker died is re-sent rather
than scored as a wrong answer."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from urllib.parse import urlparse

import httpx
import psutil
import pytest

from reward_server import client
from vlcal_verl import rewards

pytestmark = pytest.mark.integration

LOGGER = "reward_server.http_client"
# vlcal_verl.grading's own crafted input: sympy spins on the power tower until the worker is killed
HANGING_ANSWER, HANGING_TRUTH = "9**9**9**9", "\\sqrt{2}"


def response(answer: str, c_v: int = 8, c_r: int = 6) -> str:
    return (
        "<think><vision>bars</vision><reasoning>compare heights</reasoning></think>"
        f"\\boxed{{{answer}}}<analysis>ok</analysis><confidence><vision_confidence>{c_v}"
        f"</vision_confidence><reasoning_confidence>{c_r}</reasoning_confidence></confidence>"
    )


CASES = [  # (data_source, solution_str, ground_truth, extra_info), as verl passes them
    ("chartqa", response("12"), "12", {"index": 0}),
    ("chartqa", response("13", 10, 10), "12", {"index": 1}),
    ("mmmu", response("C"), "C", {"index": 2, "answer_kind": "multiple_choice"}),
    ("virl", "no structure at all", "4", None),
]
GOOD = ("t", response("\\frac{1}{2}"), "0.5")
HANGING = ("t", response(HANGING_ANSWER), HANGING_TRUTH)


def metric(server, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=5.0).text
    line = next((x for x in text.splitlines() if x.startswith(name + " ")), None)
    return float(line.split()[1]) if line else 0.0


def wait_until(predicate, what: str, limit_s: float = 20.0) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def stop(server) -> None:
    """SIGTERM the server's process group by its PID, and wait for it."""
    os.killpg(server.process.pid, signal.SIGTERM)
    server.process.wait(timeout=20)


def columns(*rows: tuple) -> list[list]:
    return [list(c) for c in zip(*rows, strict=True)]


class RetryLog(logging.Handler):
    """The client's retry log records; ``first`` is set on the first one."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []
        self.first = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.first.set()

    def retries(self) -> list[dict]:
        return [r.reward_client for r in self.records if hasattr(r, "reward_client")]


@pytest.fixture
def retry_log():
    handler, logger = RetryLog(), logging.getLogger(LOGGER)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def score_cases(url: str, **options) -> list[dict]:
    """CASES through compute_score, the function verl's reward loop awaits, on a fresh event loop."""

    async def run() -> list[dict]:
        return await asyncio.gather(
            *(client.compute_score(*case, server_url=url, **options) for case in CASES)
        )

    return asyncio.run(run())


def in_process(retries: int = 0) -> list[dict]:
    want = [{**rewards.compute_score(*case), **dict.fromkeys(client.CLIENT_METRIC_KEYS, 0)} for case in CASES]
    want[0]["reward_client_retries"] = retries  # one coalesced request: its retries sit on its first item
    return want


def assert_same(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a == pytest.approx(b)


def test_restart_is_ridden_out_and_a_server_gone_for_good_fails_in_one_line(server_factory, retry_log):
    first = server_factory()
    port = urlparse(first.url).port
    # (a budget of ~60 retries of at most 1 s each: longer than a restart, ~15 s here)
    patient = {"backoff_s": 0.2, "backoff_max_s": 1.0, "max_retries": 60, "timeout_s": 30.0}
    assert_same(score_cases(first.url, **patient), in_process())
    assert retry_log.records == []

    os.killpg(first.process.pid, signal.SIGKILL)  # a crash: server and grading workers gone at once
    first.process.wait(timeout=10)
    restarted: list = []

    def restart() -> None:  # only once the client has met the dead server, so a retry is certain
        if retry_log.first.wait(timeout=30):
            restarted.append(server_factory(port=port))

    thread = threading.Thread(target=restart, daemon=True)
    thread.start()
    second = score_cases(first.url, **patient)
    thread.join(timeout=120)
    assert restarted, "the server was not restarted"
    retries = retry_log.retries()
    assert len(retries) >= 1
    assert_same(second, in_process(retries=len(retries)))
    assert client.step_metrics(second) == {
        "reward_client/retries": len(retries),
        "reward_client/item_retries": 0,
    }
    assert [r["attempt"] for r in retries] == list(range(1, len(retries) + 1))
    for record in retry_log.records:
        message = record.getMessage()
        assert f"{first.url}/v1/score" in message and "/61 failed" in message, message

    # gone for good: the call fails within its budget, in one line naming the URL and the budget
    stop(restarted[0])
    retry_log.records.clear()
    small = {"backoff_s": 0.1, "backoff_max_s": 0.4, "max_retries": 3, "timeout_s": 5.0}
    started = time.monotonic()
    with pytest.raises(client.RewardServerError) as err:
        score_cases(first.url, **small)
    elapsed = time.monotonic() - started
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"reward server {first.url}/v1/score failed: gave up after 4 attempts in ")
    assert "(max_retries=3, backoff 0.1-0.4 s, timeout_s=5); last error: ConnectError" in message
    assert len(retry_log.retries()) == 3
    assert elapsed < 0.1 + 0.2 + 0.4 + 5.0  # the three waits, at most, plus slack for the connects


def test_shutdown_503_is_retried_after_its_retry_after_then_the_restart_scores(server_factory, retry_log):
    """SIGTERM with a batch in flight that outlasts the grace: the server answers 503 + Retry-After 1
    (reward_server/shutdown.py) and exits; the client waits ≥ 1 s, meets the port closed, and scores
    on the restarted server."""
    grace = 4.0
    first = server_factory(shutdown_grace_s=grace, timeout=60.0)  # the hanging item outlasts the grace
    port = urlparse(first.url).port
    options = {"backoff_s": 0.05, "backoff_max_s": 2.0, "max_retries": 60, "timeout_s": 60.0}
    out: dict = {}

    def score() -> None:
        try:
            out["results"] = client.compute_score_batch(
                *columns(HANGING, GOOD), server_url=first.url, **options
            )
        except Exception as err:  # reported by the assertion below
            out["error"] = err

    thread = threading.Thread(target=score, daemon=True)
    thread.start()
    wait_until(lambda: metric(first, "vlcal_rs_inflight_items") == 2, "the batch in flight")
    os.kill(first.process.pid, signal.SIGTERM)
    first.process.wait(timeout=grace + 10)
    server_factory(port=port)  # per-item grading timeout 2 s: the hanging item now times out
    thread.join(timeout=120)
    assert "error" not in out, out.get("error")
    retries = retry_log.retries()
    shutting_down = [
        r for r in retries if r["reason"].startswith("HTTP 503: ") and "shutting down" in r["reason"]
    ]
    assert len(shutting_down) == 1, retries
    assert shutting_down[0]["retry_after"] == "1" and shutting_down[0]["delay_s"] >= 1.0
    statuses = [r["grading_status"] for r in out["results"]]
    assert statuses == ["timeout", "ok"]
    assert [r["accuracy"] for r in out["results"]] == [0.0, 1.0]
    assert out["results"][0]["reward_client_retries"] == len(retries) >= 2  # the 503, then the closed port


def test_item_whose_grading_worker_died_is_resent_not_scored_wrong(server, retry_log):
    """A killed grading worker makes its item status ``error`` ("graded incorrect", not a grade): the
    client re-sends that item alone; here it hangs again and times out, a real grade."""
    out: dict = {}

    def score() -> None:
        out["results"] = client.compute_score_batch(
            *columns(HANGING, HANGING), server_url=server.url, backoff_s=0.05, timeout_s=30.0
        )

    thread = threading.Thread(target=score, daemon=True)
    thread.start()
    wait_until(lambda: metric(server, "vlcal_rs_inflight_items") == 2, "the request to be in flight")
    root = psutil.Process(server.process.pid)  # grading workers: grandchildren (forked by the forkserver)
    workers = [p for p in root.children(recursive=True) if p.ppid() != root.pid]
    assert len(workers) == 2, workers
    victim = workers[0]
    cpu0 = sum(victim.cpu_times()[:2])
    wait_until(lambda: sum(victim.cpu_times()[:2]) > cpu0 + 0.05, "the worker to be busy grading")
    os.kill(victim.pid, signal.SIGKILL)
    thread.join(timeout=60)
    assert not thread.is_alive()
    results = out["results"]
    assert [r["grading_status"] for r in results] == ["timeout", "timeout"]
    assert sorted(r["reward_client_item_retries"] for r in results) == [0, 1]
    assert client.step_metrics(results)["reward_client/item_retries"] == 1
    resent = [r.getMessage() for r in retry_log.records if "answered status error" in r.getMessage()]
    assert len(resent) == 1 and f"reward server {server.url}: 1 of 2 items" in resent[0], resent
