"""The verl client: same dicts as in-process compute_score through the real server, one HTTP request
per batch of concurrent calls, bounded retries with backoff on 503 / connection errors, none on 4xx."""

from __future__ import annotations

import asyncio
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from reward_server import client
from vlcal_verl import rewards

FAST = {"backoff_s": 0.01, "backoff_max_s": 0.05, "timeout_s": 10.0}
NO_RETRIES = dict.fromkeys(client.CLIENT_METRIC_KEYS, 0)


def response(answer: str, c_v: int = 8, c_r: int = 6) -> str:
    return (
        "<think><vision>bars</vision><reasoning>compare heights</reasoning></think>"
        f"\\boxed{{{answer}}}<analysis>ok</analysis><confidence><vision_confidence>{c_v}"
        f"</vision_confidence><reasoning_confidence>{c_r}</reasoning_confidence></confidence>"
    )


CASES = [
    ("chartqa", response("12"), "12", {"index": 0}),
    ("chartqa", response("13", 10, 10), "12", {"index": 1}),
    ("mmmu", response("C"), "C", {"index": 2, "answer_kind": "multiple_choice"}),
    ("virl", "no structure at all", "4", None),
    ("virl", response("50\\%"), "0.5", {"index": 4}),
]


def score_requests(server) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    match = re.search(r'^vlcal_rs_requests_total\{route="/v1/score",status="200"\} ([0-9.]+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


@pytest.mark.integration
def test_async_compute_score_matches_in_process_in_one_request(server):
    async def run() -> list[dict]:
        calls = [
            client.compute_score(ds, s, gt, ei, server_url=server.url, **FAST) for ds, s, gt, ei in CASES
        ]
        return await asyncio.gather(*calls)

    before = score_requests(server)
    got = asyncio.run(run())
    assert score_requests(server) == before + 1  # five concurrent calls, one batched request
    for (ds, s, gt, ei), out in zip(CASES, got, strict=True):
        assert out == pytest.approx({**rewards.compute_score(ds, s, gt, ei), **NO_RETRIES})
        assert set(out) == {*rewards.REWARD_COMPONENT_KEYS, *client.CLIENT_METRIC_KEYS}


@pytest.mark.integration
def test_batch_variants_match_in_process(server):
    columns = [list(c) for c in zip(*CASES, strict=True)]
    weights = {"w_brier": 1.0, "w_fmt": 0.1}
    want = [{**rewards.compute_score(*case, **weights), **NO_RETRIES} for case in CASES]
    sync = client.compute_score_batch(*columns, server_url=server.url, max_batch=2, **weights, **FAST)
    together = asyncio.run(
        client.compute_score_batch_async(*columns, server_url=server.url, **weights, **FAST)
    )
    for a, b, w in zip(sync, together, want, strict=True):
        assert a == pytest.approx(w) and b == pytest.approx(w)


class ScriptedServer:
    """A real HTTP server on 127.0.0.1 answering from a script of (status, headers, body)."""

    def __init__(self, script: list[tuple[int, dict, dict]]):
        self.script, self.calls = list(script), 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                payload = json.loads(self.rfile.read(int(self.headers["content-length"])))
                status, headers, body = outer.script[min(outer.calls, len(outer.script) - 1)]
                outer.calls += 1
                if callable(body):
                    body = body(payload)
                data = json.dumps(body).encode()
                self.send_response(status)
                for key, value in {"content-type": "application/json", **headers}.items():
                    self.send_header(key, value)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> ScriptedServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def ok_body(payload: dict) -> dict:
    components = {k: 1.0 for k in rewards.REWARD_COMPONENT_KEYS if k != "score"}
    results = [
        {"uid": it["uid"], "score": 1.4, "status": "ok", "components": components, "latency_ms": 1.0}
        for it in payload["items"]
    ]
    return {"results": results}


BUSY = (
    503,
    {"retry-after": "0"},
    {"detail": [{"loc": ["body", "items"], "msg": "busy", "type": "overloaded"}]},
)


@pytest.mark.integration
def test_client_retries_503_then_succeeds():
    with ScriptedServer([BUSY, BUSY, (200, {}, ok_body)]) as stub:
        out = asyncio.run(client.compute_score("d", "s", "1", server_url=stub.url, max_retries=3, **FAST))
        assert stub.calls == 3
        assert out["score"] == 1.4
        sync = client.compute_score_batch(["d"], ["s"], ["1"], server_url=stub.url, max_retries=3, **FAST)
        assert stub.calls == 4 and sync[0]["score"] == 1.4


@pytest.mark.integration
def test_client_gives_up_after_bounded_retries():
    with ScriptedServer([BUSY]) as stub:
        with pytest.raises(client.RewardServerError, match="after 3 attempts"):
            asyncio.run(client.compute_score("d", "s", "1", server_url=stub.url, max_retries=2, **FAST))
        assert stub.calls == 3


@pytest.mark.integration
def test_client_does_not_retry_4xx_and_names_the_field():
    bad = (422, {}, {"detail": [{"loc": ["body", "items", 0, "ground_truth"], "msg": "Field required"}]})
    with ScriptedServer([bad, (200, {}, ok_body)]) as stub:
        with pytest.raises(client.RewardServerError, match=r"items\.0\.ground_truth: Field required") as err:
            asyncio.run(client.compute_score("d", "s", "1", server_url=stub.url, max_retries=5, **FAST))
        assert err.value.status == 422
        assert stub.calls == 1


@pytest.mark.integration
def test_client_retries_connection_errors_boundedly():
    with ScriptedServer([BUSY]) as stub:
        url = stub.url  # closed below: nothing listens on this port any more
    with pytest.raises(client.RewardServerError, match="after 3 attempts"):
        client.compute_score_batch(["d"], ["s"], ["1"], server_url=url, max_retries=2, **FAST)


@pytest.mark.integration
def test_unscorable_item_raises_and_extra_info_is_made_json_safe():
    import numpy as np

    error = {"results": [{"uid": "x", "score": None, "status": "error", "components": {}, "error": "boom"}]}
    with ScriptedServer([(200, {}, error)]) as stub, pytest.raises(client.RewardServerError, match="boom"):
        asyncio.run(client.compute_score("d", "s", "1", server_url=stub.url, **FAST))
    info = {"index": np.int64(3), "arr": np.arange(2), "nested": {"t": (1, np.float32(0.5))}, "obj": object}
    safe = client.json_safe(info)
    assert json.loads(json.dumps(safe)) == {**safe}
    assert safe["index"] == 3 and safe["arr"] == [0, 1] and safe["nested"]["t"] == [1, 0.5]


def test_options_from_verl_reward_kwargs(monkeypatch):
    monkeypatch.setenv(client.ENV_URL, "http://rm:9000")
    opts = client.ClientOptions.from_kwargs({"max_retries": 2, "reward_router_address": None, "w_fmt": 0.0})
    assert opts.server_url == "http://rm:9000" and opts.max_retries == 2
    assert opts.weights() == {"w_fmt": 0.0}
    parity = client.ClientOptions.from_kwargs({"reference_parity": True, "reward_router_address": None})
    assert parity.weights() == {"reference_parity": True}
    with pytest.raises(ValueError, match=r"unknown reward_kwargs \['server_ulr'\]"):
        client.ClientOptions.from_kwargs({"server_ulr": "http://typo"})
    assert client.retry_delay(10, opts) <= opts.backoff_max_s
    assert client.retry_delay(0, opts, retry_after="3") >= 3.0


@pytest.mark.integration
def test_item_still_answered_error_fails_loudly_after_item_retries():
    """The real server answers a dead grading worker's item as status error *with* a score (graded
    incorrect): re-sent item_retries times, then one line naming the server and the item, never a 0."""

    def dead_worker(payload: dict) -> dict:
        body = ok_body(payload)
        for result in body["results"]:
            result.update(status="error", score=-2.0)
            result["components"]["grading_status"] = "error"
        return body

    with ScriptedServer([(200, {}, dead_worker)]) as stub:
        with pytest.raises(client.RewardServerError) as err:
            asyncio.run(client.compute_score("d", "s", "1", server_url=stub.url, item_retries=2, **FAST))
        assert stub.calls == 3
        assert str(err.value) == (
            f"reward server {stub.url} failed: 1 of 1 items still answered status error after 2 re-sends "
            "(item_retries=2); first: uid item#1: grading_status=error"
        )


@pytest.mark.integration
def test_errored_item_resent_alone_and_counted():
    sent: list[list[str]] = []

    def first_errs(payload: dict) -> dict:
        sent.append([it["uid"] for it in payload["items"]])
        body = ok_body(payload)
        if len(sent) == 1:
            body["results"][0].update(status="error", score=None, error="grading worker died (exit code -9)")
        return body

    with ScriptedServer([(200, {}, first_errs)]) as stub:
        out = client.compute_score_batch(["d", "d"], ["a", "b"], ["1", "1"], server_url=stub.url, **FAST)
    assert sent == [["0", "1"], ["0"]]
    assert [o["score"] for o in out] == [1.4, 1.4]
    assert [o["reward_client_item_retries"] for o in out] == [1, 0]
    assert client.step_metrics(out) == {"reward_client/retries": 0.0, "reward_client/item_retries": 1.0}


def test_step_metrics_sum_the_samples_and_stay_off_in_process():
    infos = [
        {"reward_client_retries": 3, "reward_client_item_retries": 0},
        {"reward_client_retries": 0, "reward_client_item_retries": 2},
        {"reward_client_retries": 1, "reward_client_item_retries": 1},
    ]
    assert client.step_metrics(infos) == {"reward_client/retries": 4.0, "reward_client/item_retries": 3.0}
    assert client.step_metrics([rewards.compute_score(*CASES[0])]) == {}  # in-process reward: no keys


def test_retry_delay_is_capped_jittered_and_honours_retry_after():
    opts = client.ClientOptions(backoff_s=0.5, backoff_max_s=4.0)
    for attempt, nominal in [(0, 0.5), (1, 1.0), (2, 2.0), (3, 4.0), (9, 4.0)]:
        delays = [client.retry_delay(attempt, opts) for _ in range(200)]
        assert nominal * 0.5 <= min(delays) and max(delays) <= nominal
    assert client.retry_delay(0, opts, retry_after="2") >= 2.0
    assert client.retry_delay(0, opts, retry_after="60") <= 4.0  # capped at backoff_max_s
    assert client.retry_delay(0, opts, retry_after="Wed, 21 Oct 2015 07:28:00 GMT") <= 0.5
