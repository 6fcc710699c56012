"""`vlcal eval` HF generation speed (items/s): the earlier sampler ("sorted") beside the current one ("cdf").

Why: a CPU evaluation of a tiny model ran at ~1 item/s; a profile put ~75% of the time in nucleus sampling
(sorting the whole 152k vocabulary at every step when the distribution is near flat). Both paths run on
the same items with the same settings (`vlcal eval`'s defaults: temperature 0.6, top-p 0.95, batch 16, 48
new tokens for a tiny model), interleaved round by round in one process so machine load hits both alike.
``--threads 1,2`` also compares torch's intra-op thread counts. Usage:
``python benchmarks/bench_eval_speed.py [--limit 32] [--rounds 2] [--threads 1,2]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny:qwen3-vl")
    p.add_argument("--bench", default="easy-vqa,easy-vqa-unanswerable")
    p.add_argument("--limit", type=int, default=32, help="items per benchmark")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--rounds", type=int, default=2, help="timed runs per path (after one warm-up batch)")
    p.add_argument("--threads", default="", help="comma-separated torch thread counts (default: torch's)")
    p.add_argument("--paths", default="sorted,cdf", help="sampler methods; the first is the baseline")
    args = p.parse_args(argv)
    if args.limit < 1 or args.rounds < 1 or args.batch_size < 1 or args.max_new_tokens < 1:
        p.error("--limit, --rounds, --batch-size and --max-new-tokens must be >= 1")
    return args


def time_path(model, processor, items, settings) -> float:
    """Seconds for one ``generate_hf`` pass over ``items``."""
    from vlcal_verl.evaluation.generate import generate_hf

    start = time.perf_counter()
    generate_hf(model, processor, items, settings)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch

    from vlcal_verl.commands.eval import load_items
    from vlcal_verl.evaluation.generate import GenerationSettings, load_hf_model

    paths = args.paths.split(",")
    threads = [int(t) for t in args.threads.split(",") if t] or [torch.get_num_threads()]
    items = [it for _, it in load_items(args.bench.split(","), None, args.limit, 0)]
    model, processor = load_hf_model(args.model)

    def settings(method: str) -> GenerationSettings:
        return GenerationSettings(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            batch_size=args.batch_size,
            seed=0,
            sampler=method,
        )

    time_path(model, processor, items[: args.batch_size], settings(paths[-1]))  # warm-up (lazy inits)
    seconds: dict[tuple[str, int], list[float]] = {(m, t): [] for t in threads for m in paths}
    load = [os.getloadavg()[0]]
    for _ in range(args.rounds):
        for t in threads:
            torch.set_num_threads(t)
            for m in paths:
                seconds[m, t].append(time_path(model, processor, items, settings(m)))
        load.append(os.getloadavg()[0])
    print(
        f"{args.model}, {len(items)} items ({args.bench}), batch {args.batch_size}, {args.max_new_tokens} new "
        f"tokens, temperature {args.temperature}, top-p {args.top_p}; {args.rounds} rounds; "
        f"load average {min(load):.1f}–{max(load):.1f} on {os.cpu_count()} CPUs"
    )
    print(
        "\n| sampler | threads | median s | items/s (median) | items/s (best) | × baseline (same threads) |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for (m, t), secs in seconds.items():
        base, med = statistics.median(seconds[paths[0], t]), statistics.median(secs)
        role = " (baseline)" if m == paths[0] else ""
        print(
            f"| {m}{role} | {t} | {med:.2f} | {len(items) / med:.2f} | {len(items) / min(secs):.2f} "
            f"| {base / med:.2f} |"
        )


if __name__ == "__main__":
    main()
