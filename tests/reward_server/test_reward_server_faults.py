"""Faults contained by the real reward server: a hanging sympy input times out alone, a killed grading
worker fails only its own item, overload is answered with 503 + Retry-After, and SIGTERM with a batch in
flight still answers it (its results within the grace period, else 503 + Retry-After), refuses new
connections and exits within the grace period."""

from __future__ import annotations

import os
import re
import signal
import threading
import time

import httpx
import psutil
import pytest

pytestmark = pytest.mark.integration

# vlcal_verl.grading's own crafted input: sympy spins on the power tower until the worker is killed
HANGING_ANSWER, HANGING_TRUTH = "9**9**9**9", "\\sqrt{2}"


def response(answer: str) -> str:
    return (
        "<think><vision>a plot</vision><reasoning>read it off</reasoning></think>"
        f"\\boxed{{{answer}}}<analysis>fine</analysis><confidence><vision_confidence>7"
        "</vision_confidence><reasoning_confidence>6</reasoning_confidence></confidence>"
    )


def good(uid: str) -> dict:
    return {"uid": uid, "data_source": "t", "response": response("\\frac{1}{2}"), "ground_truth": "0.5"}


def hanging(uid: str) -> dict:
    return {
        "uid": uid,
        "data_source": "t",
        "response": response(HANGING_ANSWER),
        "ground_truth": HANGING_TRUTH,
    }


def metric(http, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", http.get("/metrics").text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def wait_until(predicate, what: str, limit_s: float = 20.0) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def post_in_thread(server, body: dict) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run() -> None:
        with server.client() as http:
            out["reply"] = http.post("/v1/score", json=body)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def test_hanging_grading_times_out_alone(server):
    items = [good("a"), hanging("hang"), good("b")]
    with server.client() as http:
        before = metric(http, "vlcal_rs_grading_timeouts_total")
        reply = http.post("/v1/score", json={"items": items})
        assert reply.status_code == 200, reply.text
        results = {r["uid"]: r for r in reply.json()["results"]}
        assert results["hang"]["status"] == "timeout"
        assert results["hang"]["components"]["grading_status"] == "timeout"
        assert results["hang"]["components"]["accuracy"] == 0.0
        assert results["a"]["status"] == results["b"]["status"] == "ok"
        assert results["a"]["components"]["accuracy"] == 1.0
        assert metric(http, "vlcal_rs_grading_timeouts_total") == before + 1
        later = http.post("/v1/score", json={"items": [good("later")]})
        assert later.status_code == 200 and later.json()["results"][0]["status"] == "ok"
        # the killed worker was replaced by a new process: counted as a pool restart
        wait_until(lambda: metric(http, "vlcal_rs_pool_restarts_total") >= 1, "a pool restart")


def grading_workers(server) -> list[psutil.Process]:
    """Pool workers: the server's grandchildren (workers are forked by the forkserver child)."""
    root = psutil.Process(server.process.pid)
    return [p for p in root.children(recursive=True) if p.ppid() != root.pid]


def test_killed_worker_mid_request_is_survived(server):
    thread, out = post_in_thread(server, {"items": [hanging("h1"), hanging("h2")]})
    with server.client() as http:
        wait_until(lambda: metric(http, "vlcal_rs_inflight_items") == 2, "the request to be in flight")
        workers = grading_workers(server)
        assert len(workers) == 2, workers
        victim = workers[0]
        cpu0 = sum(victim.cpu_times()[:2])
        wait_until(lambda: sum(victim.cpu_times()[:2]) > cpu0 + 0.05, "the worker to be busy grading")
        os.kill(victim.pid, signal.SIGKILL)
        thread.join(timeout=30)
        assert not thread.is_alive()
        reply = out["reply"]
        assert reply.status_code == 200, reply.text
        results = reply.json()["results"]
        # the killed worker's item is an error, the other still times out; both are graded incorrect
        assert sorted(r["status"] for r in results) == ["error", "timeout"]
        assert [r["components"]["accuracy"] for r in results] == [0.0, 0.0]
        assert all(r["score"] is not None for r in reply.json()["results"])
        assert http.get("/readyz").status_code == 200
        after = http.post("/v1/score", json={"items": [good(str(i)) for i in range(4)]})
        assert after.status_code == 200
        assert [r["status"] for r in after.json()["results"]] == ["ok"] * 4


def test_overload_is_503_with_retry_after(server):
    busy = [hanging("h1"), hanging("h2")] + [good(str(i)) for i in range(14)]  # max_inflight = 16
    thread, out = post_in_thread(server, {"items": busy})
    with server.client() as http:
        wait_until(lambda: metric(http, "vlcal_rs_inflight_items") == 16, "16 items in flight")
        refused = http.post("/v1/score", json={"items": [good("extra")]})
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        assert "max_inflight=16" in refused.json()["detail"][0]["msg"]
        thread.join(timeout=30)
        assert out["reply"].status_code == 200
        accepted = http.post("/v1/score", json={"items": [good("extra")]})
        assert accepted.status_code == 200
        assert metric(http, "vlcal_rs_overload_rejections_total") >= 1


def sigterm_mid_batch(
    server, items: list[dict], grace_s: float, group: bool = False
) -> tuple[httpx.Response, float, bool]:
    """POST ``items``, SIGTERM the server process (``group``: its whole process group, grading workers
    included) once they are in flight; return (the reply, seconds from SIGTERM to the process's exit,
    whether a new connection was refused meanwhile)."""
    thread, out = post_in_thread(server, {"items": items})
    with server.client() as http:
        wait_until(lambda: metric(http, "vlcal_rs_inflight_items") == len(items), "the batch in flight")
    if group:  # a terminal's Ctrl-C, kill -TERM -PGID
        os.killpg(server.process.pid, signal.SIGTERM)
    else:  # the server process only, as Kubernetes and docker do
        os.kill(server.process.pid, signal.SIGTERM)
    sent = time.monotonic()
    refused = False
    while time.monotonic() - sent < grace_s and not refused:
        try:
            httpx.get(server.url + "/healthz", timeout=0.5)
            time.sleep(0.05)
        except httpx.ConnectError:
            refused = True
        except httpx.TransportError:
            time.sleep(0.05)
    server.process.wait(timeout=grace_s + 10)
    exited_after = time.monotonic() - sent
    thread.join(timeout=10)
    assert "reply" in out, "the in-flight request got no HTTP answer"
    return out["reply"], exited_after, refused


def test_sigterm_lets_the_in_flight_batch_finish(server_factory):
    grace = 8.0
    server = server_factory(shutdown_grace_s=grace)  # per-item grading timeout 2 s: the batch takes ~2 s
    reply, exited_after, refused = sigterm_mid_batch(server, [hanging("h"), good("a"), good("b")], grace)
    assert reply.status_code == 200, reply.text
    statuses = {r["uid"]: r["status"] for r in reply.json()["results"]}
    assert statuses == {"h": "timeout", "a": "ok", "b": "ok"}
    assert refused, "a new connection was still accepted after SIGTERM"
    assert exited_after < grace, f"exited {exited_after:.1f} s after SIGTERM (grace {grace} s)"


def test_sigterm_answers_503_when_the_grace_runs_out(server_factory):
    grace = 4.0
    server = server_factory(shutdown_grace_s=grace, timeout=60.0)  # hanging items outlast the grace
    reply, exited_after, _ = sigterm_mid_batch(server, [hanging("h1"), hanging("h2")], grace)
    assert reply.status_code == 503, reply.text
    assert reply.headers["Retry-After"] == "1"
    assert reply.json()["detail"][0]["type"] == "shutting_down"
    assert exited_after < grace, f"exited {exited_after:.1f} s after SIGTERM (grace {grace} s)"


def test_sigterm_to_the_process_group_never_answers_killed_grades_as_rewards(server_factory):
    """The signal also kills the grading workers: their items would be graded incorrect (status error),
    a wrong reward; the batch is answered 503 + Retry-After instead, to be retried elsewhere."""
    grace = 8.0
    server = server_factory(shutdown_grace_s=grace, timeout=60.0)
    reply, exited_after, _ = sigterm_mid_batch(server, [hanging("h1"), good("a")], grace, group=True)
    assert reply.status_code == 503, reply.text
    assert reply.headers["Retry-After"] == "1"
    assert "grading workers were stopped" in reply.json()["detail"][0]["msg"]
    assert exited_after < grace, f"exited {exited_after:.1f} s after SIGTERM (grace {grace} s)"
