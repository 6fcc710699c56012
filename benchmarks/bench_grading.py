"""Grading throughput (answers/s) by answer category: in-process, and through the Grader pool.

Why: I is graded for every rollout (n = 8 per prompt), and wrong math answers are the slow path
(both mathruler's sympy and math-verify run before an answer is declared wrong); this shows where
the time goes. Usage: ``python benchmarks/bench_grading.py [--n 1000] [--workers 2]``.
"""

from __future__ import annotations

import argparse
import os
import random
import time

# (prediction, ground truth) templates per category; {a}, {b} are small integers
CATEGORIES: dict[str, list[tuple[str, str]]] = {
    "math, equal strings": [("{a}", "{a}"), ("{a}^\\circ", "{a}"), ("{a} cm", "{a}"), ("{a}\\%", "{a}%")],
    "math, equivalent forms": [
        ("\\frac{{{a}}}{{{b}}}", "{a}/{b}"),
        ("\\dfrac{{1}}{{2}}", "0.5"),
        ("2\\sqrt{{{a}}}", "\\sqrt{{4*{a}}}"),
        ("({a}, {b}]", "({a},{b}]"),
    ],
    "math, wrong": [
        ("{a}", "{b}"),
        ("\\frac{{{a}}}{{{b}}}", "{a}.{b}"),
        ("\\sqrt{{{a}}}", "{b}"),
        ("x+{a}", "x-{b}"),
    ],
    "multiple choice": [("({L})", "{L}"), ("{L}. {a}", "{L}"), ("\\text{{{L}}}", "B"), ("Option {L}", "C")],
    "yes/no": [("Yes", "yes"), ("no.", "Yes"), ("\\text{{No}}", "no")],
}


def mixed_answers(n: int = 1000, seed: int = 0) -> list[tuple[str, str, str]]:
    """``n`` (prediction, ground_truth, category) triples, categories in equal shares."""
    rng = random.Random(seed)
    names = list(CATEGORIES)
    items = []
    for i in range(n):
        name = names[i % len(names)]
        pred, gt = rng.choice(CATEGORIES[name])
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        letter = rng.choice("ABCDE")
        items.append((pred.format(a=a, b=b, L=letter), gt.format(a=a, b=b, L=letter), name))
    return items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    from vlcal_verl.grading import Grader, grade_answer

    items = mixed_answers(args.n)
    grade_answer("\\frac{1}{2}", "0.5")  # imports and sympy caches
    per_cat: dict[str, list[float]] = {}
    start = time.perf_counter()
    for pred, gt, cat in items:
        t = time.perf_counter()
        grade_answer(pred, gt)
        per_cat.setdefault(cat, []).append(time.perf_counter() - t)
    sequential = time.perf_counter() - start
    with Grader(max_workers=args.workers, timeout_s=10.0) as grader:
        grader.grade_many([(p, g, None) for p, g, _ in items[: 4 * args.workers]])  # start workers
        start = time.perf_counter()
        results = grader.grade_many([(p, g, None) for p, g, _ in items])
        pooled = time.perf_counter() - start
    print(f"grading throughput, {args.n} mixed answers, {os.cpu_count()} CPUs visible")
    print("| category | answers | ms / answer (in-process) | answers/s (1 core) |")
    print("|---|---:|---:|---:|")
    for cat, times in per_cat.items():
        mean = sum(times) / len(times)
        print(f"| {cat} | {len(times)} | {1000 * mean:.2f} | {1 / mean:.0f} |")
    print(
        f"| **all, sequential** | {args.n} | {1000 * sequential / args.n:.2f} | {args.n / sequential:.0f} |"
    )
    print(
        f"| **all, Grader({args.workers} workers)** | {args.n} | – | {args.n / pooled:.0f} total, "
        f"{args.n / pooled / args.workers:.0f} per worker |"
    )
    print(
        f"statuses: { {s: sum(r.status == s for r in results) for s in ('ok', 'no_answer', 'timeout', 'error')} }"
    )


if __name__ == "__main__":
    main()
