"""The real reward server over HTTP: same numbers as in-process scoring, 4xx with the field named,
timeouts and dead workers contained to their own items."""

from __future__ import annotations

import json
import math
import time

import pytest

from vlcal_verl import rewards

pytestmark = pytest.mark.integration


def decoupled(answer: str, c_v: str = "8", c_r: str = "7") -> str:
    return (
        "<think><vision>The image shows three red apples on a table.</vision>"
        "<reasoning>Counting them one by one gives the total.</reasoning></think>\n"
        f"\\boxed{{{answer}}}\n<analysis>The apples are clearly visible.</analysis>\n"
        f"<confidence><vision_confidence>{c_v}</vision_confidence>"
        f"<reasoning_confidence>{c_r}</reasoning_confidence></confidence>"
    )


ITEMS = [
    {"uid": "correct", "data_source": "virl", "response": decoupled("3"), "ground_truth": "3"},
    {"uid": "wrong", "data_source": "virl", "response": decoupled("4", "10", "10"), "ground_truth": "3"},
    {"uid": "frac", "data_source": "virl", "response": decoupled("\\frac{1}{2}"), "ground_truth": "0.5"},
    {
        "uid": "mc",
        "data_source": "mmmu",
        "response": decoupled("B", "6", "4"),
        "ground_truth": "B",
        "extra_info": {"answer_kind": "multiple_choice"},
    },
    {"uid": "yes", "data_source": "pope", "response": decoupled("Yes", "9", "9"), "ground_truth": "yes"},
    {
        "uid": "no_box",
        "data_source": "virl",
        "response": "<think>hmm</think> I think it is 3.",
        "ground_truth": "3",
    },
    {
        "uid": "no_conf",
        "data_source": "virl",
        "response": "<think><vision>v</vision><reasoning>r</reasoning></think>\\boxed{3}",
        "ground_truth": "3",
    },
    {"uid": "zero_conf", "data_source": "virl", "response": decoupled("3", "0", "5"), "ground_truth": 3},
]


def expected(item: dict, **kwargs) -> dict:
    return rewards.compute_score(
        item["data_source"], item["response"], str(item["ground_truth"]), item.get("extra_info"), **kwargs
    )


def assert_same(result: dict, want: dict) -> None:
    assert math.isclose(result["score"], want["score"], abs_tol=1e-12), (result, want)
    for key in rewards.REWARD_COMPONENT_KEYS:
        if key == "score":
            continue
        got, exp = result["components"][key], want[key]
        if isinstance(exp, float):
            assert math.isclose(got, exp, abs_tol=1e-12), (key, got, exp)
        else:
            assert got == exp, (key, got, exp)


def test_scores_equal_in_process_compute_score(server):
    with server.client() as http:
        reply = http.post("/v1/score", json={"items": ITEMS})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert [r["uid"] for r in body["results"]] == [it["uid"] for it in ITEMS]
    for item, result in zip(ITEMS, body["results"], strict=True):
        assert_same(result, expected(item))
        assert result["latency_ms"] >= 0
    statuses = {r["uid"]: r["status"] for r in body["results"]}
    assert statuses["correct"] == "ok" and statuses["no_conf"] == "parse_error"
    assert body["reward"]["name"] == "vl-calibration"


def test_weights_and_protocol_override(server):
    weights = {"w_brier": 1.0, "w_fmt": 0.0, "protocol": "rlcr"}
    rlcr = {
        "uid": "rlcr",
        "data_source": "virl",
        "response": "<think>count</think>\\boxed{3}<analysis>ok</analysis><confidence>7</confidence>",
        "ground_truth": "3",
    }
    with server.client() as http:
        reply = http.post("/v1/score", json={"items": [*ITEMS[:2], rlcr], "weights": weights})
    assert reply.status_code == 200, reply.text
    for item, result in zip([*ITEMS[:2], rlcr], reply.json()["results"], strict=True):
        assert_same(result, expected(item, **weights))
    assert reply.json()["reward"]["weights"]["protocol"] == "rlcr"


def test_reference_parity_per_request(server):
    """weights.reference_parity switches one request to the authors' reward: "B. 12" against "B" is
    right for our multiple-choice grading and wrong for their mathruler check."""
    letter = {
        "uid": "letter",
        "data_source": "virl",
        "response": decoupled("B. 12"),
        "ground_truth": "B",
        "extra_info": {"answer_kind": "multiple_choice"},
    }
    items = [*ITEMS[:3], letter]
    with server.client() as http:
        ours = http.post("/v1/score", json={"items": items}).json()
        theirs = http.post("/v1/score", json={"items": items, "weights": {"reference_parity": True}}).json()
    for item, a, b in zip(items, ours["results"], theirs["results"], strict=True):
        assert_same(a, expected(item))
        assert_same(b, expected(item, reference_parity=True))
    assert ours["results"][-1]["components"]["accuracy"] == 1.0
    assert theirs["results"][-1]["components"]["accuracy"] == 0.0
    assert theirs["reward"]["weights"]["reference_parity"] is True
    assert ours["reward"]["weights"]["reference_parity"] is False


def test_openrlhf_get_reward_shape(server):
    prompts = ["<|im_start|>user\nHow many apples?<|im_end|>\n<|im_start|>assistant\n"] * 3
    responses = [ITEMS[0]["response"], ITEMS[1]["response"], ITEMS[5]["response"]]
    labels = ["3", "3", "3"]
    body = {
        "query": [p + r for p, r in zip(prompts, responses, strict=True)],
        "prompts": prompts,
        "labels": labels,
        "metas": [],
    }
    with server.client() as http:
        reply = http.post("/get_reward", json=body)
    assert reply.status_code == 200, reply.text
    out = reply.json()
    want = [rewards.compute_score("", r, gt) for r, gt in zip(responses, labels, strict=True)]
    assert out["rewards"] == pytest.approx([w["score"] for w in want], abs=1e-12)
    assert out["scores"] == [w["accuracy"] for w in want]
    assert out["extra_logs"]["brier"] == pytest.approx([w["brier"] for w in want], abs=1e-12)
    assert all(len(v) == 3 for v in out["extra_logs"].values())


def test_visual_labels_batch_zscore(server):
    kbar, hbar = [0.5, 2.0, 1.0, 0.1], [1.0, 0.5, 1.0, 2.0]
    samples = [
        {"uid": i, "kl_mean": k, "entropy_mean": h} for i, (k, h) in enumerate(zip(kbar, hbar, strict=True))
    ]
    tokens = {"uid": "tok", "kl": [9.0, 0.5, 1.5, 9.0], "entropy": [9.0, 1.0, 1.0, 9.0], "span": [1, 3]}
    no_span = {
        "uid": "none",
        "kl": [1.0, 2.0],
        "entropy": [1.0, 1.0],
        "span": [1, 1],
        "vision_confidence": 0.7,
    }
    with server.client() as http:
        reply = http.post("/v1/visual-labels", json={"samples": [*samples, tokens, no_span]})
    assert reply.status_code == 200, reply.text
    labels = reply.json()["labels"]
    # hand computation: S = log K̄ − log H̄ (ε negligible); token sample has K̄ = 1.0, H̄ = 1.0 on [1, 3)
    s = [math.log(k) - math.log(h) for k, h in [*zip(kbar, hbar, strict=True), (1.0, 1.0)]]
    mean = sum(s) / len(s)
    std = math.sqrt(sum((x - mean) ** 2 for x in s) / len(s))
    want = [1 / (1 + math.exp(-(x - mean) / std)) for x in s]
    assert [lb["s_tilde"] for lb in labels[:5]] == pytest.approx(want, abs=1e-6)
    assert labels[4]["kl_mean"] == pytest.approx(1.0) and labels[4]["entropy_mean"] == pytest.approx(1.0)
    assert labels[5]["s_tilde"] is None and labels[5]["visual_reward"] == -1.0
    assert reply.json()["n_with_span"] == 5


def test_health_ready_info_metrics(server):
    with server.client() as http:
        assert http.get("/healthz").json()["status"] == "ok"
        assert http.get("/readyz").status_code == 200
        info = http.get("/v1/info").json()
        assert info["limits"]["max_items"] == 16 and info["workers"] == 2
        assert info["component_keys"] == list(rewards.REWARD_COMPONENT_KEYS)
        text = http.get("/metrics").text
    for name in (
        "vlcal_rs_requests_total",
        "vlcal_rs_request_latency_seconds_bucket",
        "vlcal_rs_items_scored_total",
        "vlcal_rs_grading_timeouts_total",
        "vlcal_rs_parse_failures_total",
        "vlcal_rs_pool_restarts_total",
        "vlcal_rs_inflight_items",
    ):
        assert name in text, name
    assert 'vlcal_rs_requests_total{route="/v1/score",status="200"}' in text


# ---- 4xx with the field named ----------------------------------------------------------------------


def detail(reply) -> list[dict]:
    return reply.json()["detail"]


def test_malformed_json_is_400(server):
    with server.client() as http:
        reply = http.post("/v1/score", content=b'{"items": [', headers={"content-type": "application/json"})
    assert reply.status_code == 400
    assert "malformed JSON" in detail(reply)[0]["msg"]


def test_wrong_type_and_missing_field_are_422_with_path(server):
    bad_type = {"items": [ITEMS[0], {**ITEMS[1], "response": 123}]}
    missing = {"items": [{k: v for k, v in ITEMS[0].items() if k != "ground_truth"}]}
    unknown_weight = {"items": ITEMS[:1], "weights": {"w_brer": 1.0}}
    with server.client() as http:
        r1 = http.post("/v1/score", json=bad_type)
        r2 = http.post("/v1/score", json=missing)
        r3 = http.post("/v1/score", json=unknown_weight)
        r4 = http.post("/v1/score", json={"items": ITEMS[:1], "reward": {"name": "other-reward"}})
        r5 = http.post("/v1/visual-labels", json={"samples": [{"uid": 1, "kl_mean": -1, "entropy_mean": 1}]})
    assert r1.status_code == 422 and detail(r1)[0]["loc"] == ["body", "items", 1, "response"]
    assert r2.status_code == 422 and detail(r2)[0]["loc"] == ["body", "items", 0, "ground_truth"]
    assert detail(r2)[0]["type"] == "missing"
    assert r3.status_code == 422 and detail(r3)[0]["loc"] == ["body", "weights", "w_brer"]
    assert r4.status_code == 422 and detail(r4)[0]["loc"] == ["body", "reward", "name"]
    assert r5.status_code == 422 and detail(r5)[0]["loc"] == ["body", "samples", 0, "kl_mean"]


def test_oversized_requests_are_413_naming_the_limit(server):
    too_many = {"items": [{**ITEMS[0], "uid": str(i)} for i in range(17)]}
    too_long = {"items": [ITEMS[0], {**ITEMS[1], "response": "x" * 20_001}]}
    too_big = {"items": [{**ITEMS[0], "extra_info": {"blob": "y" * 250_000}}]}
    with server.client() as http:
        r1 = http.post("/v1/score", json=too_many)
        r2 = http.post("/v1/score", json=too_long)
        r3 = http.post("/v1/score", json=too_big)
        r4 = http.post("/get_reward", json={"query": ["q"] * 17, "labels": ["1"] * 17})
    assert r1.status_code == 413 and "max_items=16" in detail(r1)[0]["msg"]
    assert detail(r1)[0]["loc"] == ["body", "items"]
    assert r2.status_code == 413 and detail(r2)[0]["loc"] == ["body", "items", 1, "response"]
    assert "max_response_chars" in detail(r2)[0]["msg"]
    assert r3.status_code == 413 and "max_body_bytes=200000" in detail(r3)[0]["msg"]
    assert r4.status_code == 413 and detail(r4)[0]["loc"] == ["body", "query"]


def test_chunked_body_over_the_limit_is_413(server):
    def chunks():  # no Content-Length: the limit is enforced while the body streams in
        yield b'{"items": [{"uid": "1", "data_source": "", "ground_truth": "1", "response": "'
        for _ in range(30):
            yield b"z" * 10_000
        yield b'"}]}'

    with server.client() as http:
        reply = http.post("/v1/score", content=chunks(), headers={"content-type": "application/json"})
    assert reply.status_code == 413 and "max_body_bytes=200000" in detail(reply)[0]["msg"]


def test_deeply_nested_json_is_400_in_the_documented_shape(server):
    nested = "[" * 50_000 + "]" * 50_000  # 100 kB, under the test max_body_bytes
    body = (
        '{"items": [{"uid": "1", "response": "x", "ground_truth": "1", "extra_info": {"a": ' + nested + "}}]}"
    )
    with server.client() as http:
        reply = http.post("/v1/score", content=body, headers={"content-type": "application/json"})
        missing = http.get("/no/such/route")
    assert reply.status_code == 400
    assert isinstance(detail(reply), list) and detail(reply)[0]["loc"] == ["body"]
    assert detail(reply)[0]["type"] == "json_invalid" and "nested too deeply" in detail(reply)[0]["msg"]
    assert missing.status_code == 404 and detail(missing) == [
        {"loc": [], "msg": "Not Found", "type": "not_found"}
    ]


# ---- /get_reward when the prompt is not a prefix of the query ------------------------------------


def test_get_reward_finds_the_response_after_expanded_image_tokens_and_flags_the_rest(server):
    def prompt(n_pads: int) -> str:
        return (
            "<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * n_pads + "<|vision_end|>"
            "Answer in this format: <think><vision>..</vision><reasoning>..</reasoning></think>"
            "\\boxed{3}<confidence>..</confidence><|im_end|>\n<|im_start|>assistant\n"
        )

    right = ITEMS[0]["response"]
    body = {
        "query": [prompt(64) + right, "the model's words, with no trace of the prompt"],
        "prompts": [prompt(1), prompt(1)],
        "labels": ["3", "3"],
    }
    with server.client() as http:
        before = metric_value(
            http.get("/metrics").text, 'vlcal_rs_get_reward_splits_total{method="not_found"}'
        )
        reply = http.post("/get_reward", json=body)
        after = metric_value(
            http.get("/metrics").text, 'vlcal_rs_get_reward_splits_total{method="not_found"}'
        )
    assert reply.status_code == 200, reply.text
    out = reply.json()
    want = rewards.compute_score("", right, "3")
    assert out["rewards"][0] == pytest.approx(want["score"], abs=1e-12) and out["scores"][0] == 1.0
    # not found: the empty response's penalty (−w_brier·1, no format credit), never the prompt's tags
    assert out["rewards"][1] == pytest.approx(rewards.compute_score("", "", "3")["score"], abs=1e-12)
    assert out["rewards"][1] == pytest.approx(-2.0) and out["scores"][1] == 0.0
    assert out["split"] == ["prompt_suffix", "not_found"]
    assert out["extra_logs"]["response_not_found"] == [0.0, 1.0]
    assert after - before == 1.0


def metric_value(text: str, sample: str) -> float:
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


def test_first_visual_labels_call_is_fast_once_ready(fresh_server):
    """torch is imported during start-up, before /readyz says ready (it took ~9 s on the first call)."""
    with fresh_server.client() as http:
        start = time.perf_counter()
        reply = http.post(
            "/v1/visual-labels", json={"samples": [{"uid": 1, "kl_mean": 1, "entropy_mean": 2}]}
        )
        elapsed = time.perf_counter() - start
    assert reply.status_code == 200 and reply.json()["n_with_span"] == 1
    assert elapsed < 1.0, f"first /v1/visual-labels took {elapsed:.1f} s"


def test_a_body_declared_as_not_json_is_415_naming_the_header(server):
    """A JSON body sent as text/plain or a form is refused with 415 naming the Content-Type (FastAPI's own
    answer, 422 "Input should be a valid dictionary", points at the fields); no Content-Type, a charset
    parameter or a UTF-8 byte-order mark still score."""
    body = json.dumps({"items": ITEMS[:1]}).encode()
    with server.client() as http:
        for declared in ("text/plain", "application/x-www-form-urlencoded"):
            reply = http.post("/v1/score", content=body, headers={"content-type": declared})
            assert reply.status_code == 415, reply.text
            (entry,) = detail(reply)
            assert entry["loc"] == ["header", "content-type"] and declared in entry["msg"]
            assert "application/json" in entry["msg"]
        for headers, content in (
            ({}, body),
            ({"content-type": "application/json; charset=utf-8"}, body),
            ({"content-type": "application/json"}, b"\xef\xbb\xbf" + body),
        ):
            reply = http.post("/v1/score", content=content, headers=headers)
            assert reply.status_code == 200, (headers, reply.text)
            assert_same(reply.json()["results"][0], expected(ITEMS[0]))


def test_authors_rlcr_reward_as_training_computes_it(server):
    """protocol rlcr + reference_parity (training's ablation=rlcr in parity mode: w_brier 0.8) gives
    compute_score's numbers: the authors' (c/10)^1.3 confidence, 0.5 when missing, whole-layout format."""
    weights = {"protocol": "rlcr", "reference_parity": True, "w_brier": 0.8, "w_vis": 0.0}
    rlcr = "<think>count</think>\\boxed{%s}<analysis>ok</analysis><confidence>%s</confidence>"
    items = [
        {"uid": "right", "data_source": "virl", "response": rlcr % ("3", "7"), "ground_truth": "3"},
        {"uid": "wrong", "data_source": "virl", "response": rlcr % ("4", "10"), "ground_truth": "3"},
        {"uid": "low", "data_source": "virl", "response": rlcr % ("3", "0.5"), "ground_truth": "3"},
        {"uid": "none", "data_source": "virl", "response": "\\boxed{3}", "ground_truth": "3"},
    ]
    with server.client() as http:
        reply = http.post("/v1/score", json={"items": items, "weights": weights})
    assert reply.status_code == 200, reply.text
    results = reply.json()["results"]
    for item, result in zip(items, results, strict=True):
        assert_same(result, expected(item, **weights))
    right = results[0]["components"]
    assert math.isclose(right["confidence"], 0.7**1.3) and right["format"] == 1.0
    assert math.isclose(results[0]["score"], 1 - 0.8 * (1 - 0.7**1.3) ** 2 + 0.4)  # I + 0.8·Brier + 0.4·F
    assert results[2]["components"]["format"] == 0.5  # 0.5 is a float outside [1, 10]
    assert results[3]["components"]["confidence"] == 0.5 and results[3]["components"]["parse_ok"] is False
