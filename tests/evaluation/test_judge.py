"""``vlcal judge`` against stub OpenAI-compatible servers on 127.0.0.1: the request carries the item's own
image and description, verdicts land in the judgments file ``vlcal eval --judgments`` reads, reruns
resume, and timeouts, 5xx and garbage replies are counted and retried, never a crash."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from vlcal_verl.cli import main
from vlcal_verl.commands.judge import parse_verdict


def _response(description: str) -> str:
    return (
        f"<think><vision>{description}</vision><reasoning>r</reasoning></think>\\boxed{{yes}}"
        "<analysis>a</analysis><confidence><vision_confidence>8</vision_confidence>"
        "<reasoning_confidence>9</reasoning_confidence></confidence>"
    )


@pytest.fixture(scope="module")
def items():
    from vlcal_verl.data.easy_vqa import load_easy_vqa

    return load_easy_vqa("test", limit=4, seed=0)


@pytest.fixture
def gens(tmp_path, items):
    descriptions = ["a red shape", "a blue shape", None, "a red thing"]
    rows = [
        {
            "benchmark": "easy-vqa",
            "uid": it.uid,
            "response": _response(d) if d else "no tags, no description",
            "ground_truth": it.answer,
        }
        for it, d in zip(items, descriptions, strict=True)
    ]
    path = tmp_path / "generations.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class Stub:
    """A threaded HTTP server whose reply is ``behaviour(request_json, attempt_of_this_description)``."""

    def __init__(self, behaviour):
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub.lock:
                    stub.requests.append(
                        {"path": self.path, "body": body, "auth": self.headers.get("Authorization")}
                    )
                    attempt = sum(r["body"] == body for r in stub.requests)
                status, payload = behaviour(body, attempt)
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(payload if isinstance(payload, bytes) else json.dumps(payload).encode())
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _text(body):
    return body["messages"][0]["content"][-1]["text"]


def _chat(content):
    return {"choices": [{"message": {"role": "assistant", "content": content}}]}


def _faithful_if_red(body, attempt):
    return 200, _chat("Yes." if "red" in _text(body).split("Description:")[-1] else "No, it is not.")


@pytest.fixture
def stub_factory():
    stubs = []

    def make(behaviour):
        stubs.append(Stub(behaviour))
        return stubs[-1]

    yield make
    for s in stubs:
        s.close()


def _judge(gens, url, *extra):
    return main(["judge", "--generations", str(gens), "--api-base", url, "--model", "judge-vl", *extra])


def test_judgments_file_from_stub_with_the_items_images(gens, items, stub_factory, monkeypatch):
    monkeypatch.setenv("MY_KEY", "sekret")
    stub = stub_factory(_faithful_if_red)
    assert _judge(gens, stub.url, "--concurrency", "2", "--api-key-env", "MY_KEY") == 0
    out = gens.with_name("visual_judgments.json")
    assert json.loads(out.read_text()) == {
        items[0].uid: 1,
        items[1].uid: 0,
        items[3].uid: 1,
    }  # item 2: no <vision>
    assert len(stub.requests) == 3 and {r["path"] for r in stub.requests} == {"/v1/chat/completions"}
    assert {r["auth"] for r in stub.requests} == {"Bearer sekret"}
    by_desc = {_text(r["body"]).split("Description:\n")[-1]: r["body"] for r in stub.requests}
    for it, desc in ((items[0], "a red shape"), (items[1], "a blue shape")):
        body = by_desc[desc]
        assert body["model"] == "judge-vl" and body["temperature"] == 0.0
        url = body["messages"][0]["content"][0]["image_url"]["url"]
        sent = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
        assert np.array_equal(np.asarray(sent.convert("RGB")), np.asarray(it.image.convert("RGB")))

    # resumable: a rerun asks nothing; a removed entry is asked again
    assert _judge(gens, stub.url) == 0 and len(stub.requests) == 3
    data = json.loads(out.read_text())
    del data[items[1].uid]
    out.write_text(json.dumps(data))
    assert _judge(gens, stub.url) == 0 and len(stub.requests) == 4
    assert json.loads(out.read_text())[items[1].uid] == 0


def test_judgments_file_is_what_eval_reads(gens, tmp_path, stub_factory):
    stub = stub_factory(_faithful_if_red)
    assert _judge(gens, stub.url, "--out", str(tmp_path / "j.json")) == 0
    rep = tmp_path / "rep"
    assert (
        main(["eval", "--generations", str(gens), "--out", str(rep), "--judgments", str(tmp_path / "j.json")])
        == 0
    )
    va = json.loads((rep / "metrics.json").read_text())["visual_agreement"]
    assert va["n_missing"] == 4  # read; no s_vis in these generations (that needs --vce)


def test_timeouts_are_counted_and_retried_not_fatal(gens, stub_factory, capsys):
    def slow(body, attempt):
        time.sleep(1.5)
        return 200, _chat("yes")

    stub = stub_factory(slow)
    t0 = time.monotonic()
    rc = _judge(gens, stub.url, "--timeout", "0.3", "--retries", "1", "--concurrency", "3")
    assert rc == 1 and time.monotonic() - t0 < 10  # nothing judged: a failing exit, no traceback
    assert len(stub.requests) == 6  # 3 items × (1 + 1 retry)
    out = capsys.readouterr().out
    assert "judged 0; failed 3 {'timeout': 3}" in out
    assert json.loads(gens.with_name("visual_judgments.json").read_text()) == {}


def test_garbage_and_server_errors_are_counted(gens, items, stub_factory, capsys):
    def garbage(body, attempt):
        desc = _text(body).split("Description:\n")[-1]
        if desc == "a red shape":
            return 200, b"<html>not json</html>"
        if desc == "a blue shape":
            return 200, {"choices": []} if attempt == 1 else _chat("perhaps")
        return (503, {"error": "busy"}) if attempt == 1 else (200, _chat("YES"))  # retried, then fine

    stub = stub_factory(garbage)
    assert _judge(gens, stub.url, "--retries", "2") == 0
    assert "judged 1; failed 2 {'garbage': 2}" in capsys.readouterr().out
    assert json.loads(gens.with_name("visual_judgments.json").read_text()) == {items[3].uid: 1}
    # a rerun retries the unjudged ones only
    n = len(stub.requests)
    assert _judge(gens, stub.url) == 1 and len(stub.requests) == n + 2  # both still garbage: rc 1


def test_unreachable_endpoint_is_counted(gens, capsys):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert _judge(gens, f"http://127.0.0.1:{port}/v1", "--retries", "0", "--timeout", "2") == 1
    assert "{'connection': 3}" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--api-base", "localhost:8000"], "--api-base"),
        (["--concurrency", "0"], "--concurrency"),
        (["--timeout", "0"], "--timeout"),
    ],
)
def test_mistakes_are_one_line(gens, capsys, args, needle):
    base = {"--api-base": "http://127.0.0.1:9/v1"}
    argv = ["judge", "--generations", str(gens), "--model", "m", *args]
    if "--api-base" not in args:
        argv += ["--api-base", base["--api-base"]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vlcal judge: ") and needle in err and "\n" not in err


def test_other_mistakes(tmp_path, gens, capsys):
    url = "http://127.0.0.1:9/v1"
    assert _judge(tmp_path / "none.jsonl", url) == 2
    assert "no such file" in capsys.readouterr().err
    bad_out = tmp_path / "bad.json"
    bad_out.write_text("not json")
    assert _judge(gens, url, "--out", str(bad_out)) == 2
    assert "not a judgments JSON" in capsys.readouterr().err
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"benchmark": "mathvista", "uid": "u", "response": _response("x")}) + "\n")
    assert _judge(other, url) == 2
    assert (
        "mathvista.parquet" in capsys.readouterr().err
        and not other.with_name("visual_judgments.json").exists()
    )


def test_out_that_is_not_a_judgments_file_is_refused_untouched(tmp_path, gens, capsys):
    """A report's metrics.json (any JSON object) as --out: refused in one line and left as it was —
    not counted as judgments and rewritten. A judgments file (with a byte-order mark) is resumed."""
    url = "http://127.0.0.1:9/v1"  # never reached: the mistake is reported first
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"overall": {"n": 3, "ece": 0.1}, "per_benchmark": {}}))
    before = metrics.read_bytes()
    for content in (before, b'{"u1": 1, "u2": 0.5}', b'{"u1": true}'):
        metrics.write_bytes(content)
        assert _judge(gens, url, "--out", str(metrics)) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("vlcal judge: ") and "not a judgments file" in err and "\n" not in err, err
        assert metrics.read_bytes() == content
    uids = [json.loads(line)["uid"] for line in gens.read_text().splitlines()]
    done = tmp_path / "done.json"
    done.write_bytes(b"\xef\xbb\xbf" + json.dumps(dict.fromkeys(uids, 1)).encode())
    assert _judge(gens, url, "--out", str(done)) == 0
    assert f"holds {len(set(uids))} judgments" in capsys.readouterr().out


def test_parse_verdict():
    assert [parse_verdict(s) for s in ("yes", "Yes, faithful.", "no.", "`No`", "Faithful", "", 3)] == [
        1, 1, 0, 0, None, None, None,
    ]  # fmt: skip
