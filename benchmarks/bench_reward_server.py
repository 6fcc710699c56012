"""Reward server vs in-process scoring on the same 10,000 realistic responses.

One run measures, on this machine:

* in-process ``rewards.compute_score`` called item by item (what verl's naive reward manager does
  with a sync reward function; grading in the process-wide pool), and ``rewards.score_many`` (all
  answers submitted at once to a pool with as many workers as the server);
* the real server (``python -m reward_server`` on 127.0.0.1, a subprocess) driven by 1, 16 and 64
  concurrent clients, each posting ``/v1/score`` batches of ``--batch-size`` items (default 64, like
  the verl client's micro-batches), with throughput, p50/p99 request latency, errors and the peak RSS
  of the server process tree (server + forkserver + grading workers, sampled every 50 ms).

Usage: ``python benchmarks/bench_reward_server.py [--items 10000] [--batch-size 64] [--workers N]``.
Loopback only; every loop is bounded (items are split into a fixed list of batches).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "reward_server"))

WARMUP = 256  # items scored untimed by every path before its timed run

WORDS = [
    "the",
    "bar",
    "chart",
    "shows",
    "a",
    "red",
    "blue",
    "green",
    "line",
    "axis",
    "label",
    "value",
    "peak",
    "lower",
    "higher",
    "than",
    "each",
    "two",
    "three",
    "triangle",
    "angle",
    "side",
    "length",
    "area",
    "circle",
    "radius",
    "graph",
    "point",
    "curve",
    "table",
    "row",
    "column",
    "total",
    "sum",
    "image",
    "left",
    "right",
    "top",
    "bottom",
    "object",
    "counted",
    "visible",
    "small",
    "large",
    "number",
    "between",
    "roughly",
    "equal",
]


def _sentence(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words)).capitalize() + "."


def _answer_pair(rng: random.Random) -> tuple[str, str, str | None]:
    """(model answer, ground truth, kind): a realistic mix of answer types, ~55% correct."""
    roll, right = rng.random(), rng.random() < 0.55
    if roll < 0.35:
        gt = str(rng.randint(0, 500))
        return (gt if right else str(int(gt) + rng.randint(1, 9))), gt, None
    if roll < 0.5:
        a, b = rng.randint(1, 9), rng.randint(10, 20)
        return (f"\\frac{{{a}}}{{{b}}}" if right else f"\\frac{{{a + 1}}}{{{b}}}"), f"{a / b:.6g}", None
    if roll < 0.6:
        k = rng.randint(2, 9)
        return (f"{k}\\sqrt{{2}}" if right else f"{k}\\sqrt{{3}}"), f"\\sqrt{{{2 * k * k}}}", None
    if roll < 0.8:
        gt = rng.choice("ABCD")
        return (gt if right else rng.choice("ABCD")), gt, "multiple_choice"
    if roll < 0.9:
        gt = rng.choice(["yes", "no"])
        return (gt.capitalize() if right else "Maybe"), gt, "yes_no"
    deg = rng.randint(10, 80)
    return (f"{deg}^\\circ" if right else f"{deg + 5}^\\circ"), str(deg), None


def make_items(n: int, seed: int = 0) -> list[dict]:
    """n decoupled-protocol responses (~0.5-2 KB): well formed, wrong, and ~12% malformed."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        answer, gt, kind = _answer_pair(rng)
        vision = " ".join(_sentence(rng, rng.randint(8, 20)) for _ in range(rng.randint(1, 4)))
        reasoning = " ".join(_sentence(rng, rng.randint(8, 20)) for _ in range(rng.randint(2, 10)))
        c_v, c_r = rng.randint(0, 10), rng.randint(0, 10)
        text = (
            f"<think><vision>{vision}</vision><reasoning>{reasoning}</reasoning></think>\n"
            f"\\boxed{{{answer}}}\n<analysis>{_sentence(rng, 15)}</analysis>\n"
            f"<confidence><vision_confidence>{c_v}</vision_confidence>"
            f"<reasoning_confidence>{c_r}</reasoning_confidence></confidence>"
        )
        flaw = rng.random()
        if flaw < 0.05:
            text = text.split("<confidence>")[0]  # no confidence block
        elif flaw < 0.09:
            text = text.replace(f"\\boxed{{{answer}}}", f"The answer is {answer}.")  # no box
        elif flaw < 0.12:
            text = text.replace(f">{c_v}<", ">very high<")  # confidence not a number
        item = {"uid": str(i), "data_source": "bench", "response": text, "ground_truth": gt}
        if kind:
            item["extra_info"] = {"answer_kind": kind}
        items.append(item)
    return items


def in_process_sequential(items: list[dict]) -> dict:
    from vlcal_verl import rewards

    for it in items[:WARMUP]:  # untimed: lazy imports and parser set-up, as the server's warm-up does
        rewards.compute_score(it["data_source"], it["response"], it["ground_truth"], it.get("extra_info"))
    start = time.perf_counter()
    for it in items:
        rewards.compute_score(it["data_source"], it["response"], it["ground_truth"], it.get("extra_info"))
    return {"seconds": time.perf_counter() - start}


def in_process_pool(items: list[dict], workers: int) -> dict:
    from vlcal_verl import grading, rewards

    triples = [
        (it["response"], it["ground_truth"], (it.get("extra_info") or {}).get("answer_kind")) for it in items
    ]
    with grading.Grader(max_workers=workers) as grader:
        rewards.score_many(triples[:WARMUP], grader=grader)  # untimed warm-up
        start = time.perf_counter()
        rewards.score_many(triples, grader=grader)
        return {"seconds": time.perf_counter() - start}


class RssSampler(threading.Thread):
    """Peak RSS of a process and all its descendants, sampled every 50 ms until stopped."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.root, self.peak, self._done = psutil.Process(pid), 0, threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.05):
            total = 0
            for p in [self.root, *self.root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    total += p.memory_info().rss
            self.peak = max(self.peak, total)

    def stop(self) -> int:
        self._done.set()
        self.join(timeout=5)
        return self.peak


async def drive(url: str, batches: list[list[dict]], clients: int) -> dict:
    """``clients`` concurrent loops, each posting the next unsent batch until none is left."""
    queue: asyncio.Queue = asyncio.Queue()
    for b in batches:
        queue.put_nowait(b)
    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=300.0, limits=limits) as http:

        async def worker() -> None:
            nonlocal errors
            while not queue.empty():
                batch = queue.get_nowait()
                t0 = time.perf_counter()
                reply = await http.post("/v1/score", json={"items": batch})
                latencies.append(time.perf_counter() - t0)
                if reply.status_code != 200:
                    errors += len(batch)
                    continue
                errors += sum(r["status"] == "error" for r in reply.json()["results"])

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        seconds = time.perf_counter() - start
    latencies.sort()
    return {
        "seconds": seconds,
        "p50_ms": 1e3 * statistics.median(latencies),
        "p99_ms": 1e3 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "errors": errors,
    }


def run_server(items: list[dict], workers: int, batch_size: int, concurrency: list[int]) -> list[dict]:
    from conftest import start_server, stop_server

    batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    server = start_server(workers=workers, max_items=max(batch_size, 1024), max_inflight=1 << 20,
                          max_body_bytes=64 << 20, max_response_chars=1 << 20, timeout=5.0)  # fmt: skip
    rows = []
    try:
        asyncio.run(drive(server.url, batches[: max(1, WARMUP // batch_size)], 1))  # untimed warm-up
        for clients in concurrency:
            sampler = RssSampler(server.process.pid)
            sampler.start()
            out = asyncio.run(drive(server.url, batches, clients))
            out["peak_rss_mb"] = sampler.stop() / 2**20
            out["clients"] = clients
            rows.append(out)
    finally:
        stop_server(server)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--clients", default="1,16,64")
    parser.add_argument("--out", default="runs/bench_reward_server.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    items = make_items(args.items)
    n = len(items)
    seq = in_process_sequential(items)
    pool = in_process_pool(items, args.workers)
    rows = run_server(items, args.workers, args.batch_size, [int(c) for c in args.clients.split(",")])
    base = max(n / pool["seconds"], n / seq["seconds"])  # the better in-process path is the baseline
    print(f"\n{n} items, batch size {args.batch_size}, {args.workers} grading workers, machine: "
          f"{os.cpu_count()}-core {os.uname().machine}\n")  # fmt: skip
    print("| mode | clients | items/s | vs best in-process | p50 ms | p99 ms | errors | peak RSS MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| in-process compute_score, item by item | 1 | {n / seq['seconds']:.0f} | "
          f"{n / seq['seconds'] / base:.2f}x | - | - | 0 | - |")  # fmt: skip
    print(
        f"| in-process score_many (pool) | 1 | {n / pool['seconds']:.0f} | {n / pool['seconds'] / base:.2f}x | - | - | 0 | - |"
    )
    for r in rows:
        print(f"| server /v1/score | {r['clients']} | {n / r['seconds']:.0f} | {n / r['seconds'] / base:.2f}x | "
              f"{r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['errors']} | {r['peak_rss_mb']:.0f} |")  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps({"items": n, "sequential": seq, "pool": pool, "server": rows}, indent=2)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
