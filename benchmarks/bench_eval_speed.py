"""`vlcal eval` HF generation speed (items/s): the earlier sampler ("sorted") beside the current one ("cdf").

Why: a CPU evaluation of a tiny model ran at ~1 item/s; a profile put ~75% of the time in nucleus sampling
(sorting the whole 152k vocabulary at every step when the distribution is near flat). Both paths run on
the same items with the same settings (`vlcal eval`'s defaults: temperature 0.6, top-p 0.95, batch 16, 48
new tokens for a tiny model), interleaved round by round in one process so machine load hits both alike.
Each configuration is SAMPLER:THREADS (torch intra-op threads; ``auto`` = what ``vlcal eval`` now picks,
1 for a tiny model); the baseline is the earlier sampler at torch's default threads, i.e. how ``vlcal eval``
ran before. Usage: ``python benchmarks/bench_eval_speed.py [--limit 32] [--rounds 2] [--configs ...]``.
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
    p.add_argument(
        "--configs",
        default="",
        help="comma-separated SAMPLER:THREADS (THREADS a number, or 'auto': what vlcal eval picks); the "
        "first is the baseline; default: sorted:N,cdf:auto,sorted:1,cdf:N with N = torch's threads",
    )
    args = p.parse_args(argv)
    if args.limit < 1 or args.rounds < 1 or args.batch_size < 1 or args.max_new_tokens < 1:
        p.error("--limit, --rounds, --batch-size and --max-new-tokens must be >= 1")
    try:
        parse_configs(args.configs, 1)
    except ValueError as err:
        p.error(f"--configs: {err}")
    return args


def time_path(model, processor, items, settings) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) for one ``generate_hf`` pass over ``items``. On a
    loaded machine the CPU seconds of a 1-thread run say what the wall time would be on an idle core."""
    from vlcal_verl.evaluation.generate import generate_hf

    start, cpu = time.perf_counter(), time.process_time()
    generate_hf(model, processor, items, settings)
    return time.perf_counter() - start, time.process_time() - cpu


def parse_configs(spec: str, default_threads: int) -> list[tuple[str, int | None]]:
    """``"sorted:2,cdf:auto"`` → [("sorted", 2), ("cdf", None)] (None: ``generation_threads``)."""
    spec = spec or f"sorted:{default_threads},cdf:auto,sorted:1,cdf:{default_threads}"
    out = []
    for part in spec.split(","):
        method, _, threads = part.partition(":")
        if method not in ("sorted", "cdf") or not (
            threads in ("", "auto") or (threads.isdigit() and int(threads))
        ):
            raise ValueError(f"{part!r} is not SAMPLER:THREADS with SAMPLER sorted|cdf, THREADS >= 1 or auto")
        out.append((method, None if threads in ("", "auto") else int(threads)))
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch

    from vlcal_verl.commands.eval import load_items
    from vlcal_verl.evaluation.generate import GenerationSettings, generation_threads, load_hf_model

    configs = parse_configs(args.configs, torch.get_num_threads())
    items = [it for _, it in load_items(args.bench.split(","), None, args.limit, 0)]
    model, processor = load_hf_model(args.model)
    auto = generation_threads(model)

    def settings(method: str, threads: int | None) -> GenerationSettings:
        return GenerationSettings(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            batch_size=args.batch_size,
            seed=0,
            sampler=method,
            threads=threads,
        )

    time_path(model, processor, items[: args.batch_size], settings("cdf", None))  # warm-up (lazy inits)
    seconds: dict[tuple[str, int | None], list[tuple[float, float]]] = {c: [] for c in configs}
    load = [os.getloadavg()[0]]
    for _ in range(args.rounds):
        for method, threads in configs:
            seconds[method, threads].append(time_path(model, processor, items, settings(method, threads)))
        load.append(os.getloadavg()[0])
    print(
        f"{args.model}, {len(items)} items ({args.bench}), batch {args.batch_size}, {args.max_new_tokens} new "
        f"tokens, temperature {args.temperature}, top-p {args.top_p}; {args.rounds} rounds; "
        f"load average {min(load):.1f}–{max(load):.1f} on {os.cpu_count()} CPUs; auto threads = {auto}"
    )
    print(
        "\n| sampler | threads | median s | items/s (median) | items/s (best) | × baseline | CPU s "
        "| items per CPU s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    base = statistics.median(wall for wall, _ in seconds[configs[0]])
    for i, ((method, threads), runs) in enumerate(seconds.items()):
        med, cpu = statistics.median(w for w, _ in runs), statistics.median(c for _, c in runs)
        name = method + (" (baseline)" if i == 0 else "")
        t = f"auto ({auto})" if threads is None else str(threads)
        print(
            f"| {name} | {t} | {med:.2f} | {len(items) / med:.2f} | {len(items) / min(w for w, _ in runs):.2f} "
            f"| {base / med:.2f} | {cpu:.2f} | {len(items) / cpu:.2f} |"
        )


if __name__ == "__main__":
    main()
