"""``vlcal eval``: generate on benchmarks (or take existing generations), score, write the report.

    vlcal eval --model tiny:qwen3-vl --bench easy-vqa,easy-vqa-unanswerable --limit 200 --out DIR
    vlcal eval --model /ckpt/hf --backend vllm --bench easy-vqa --out DIR
    vlcal eval --generations gens.jsonl --out DIR [--judgments judgments.json]

Offline benchmarks: ``easy-vqa`` and ``easy-vqa-unanswerable`` (test split of the easy-vqa package).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BENCHES = {
    "easy-vqa": {"unanswerable": False},
    "easy-vqa-unanswerable": {"unanswerable": True},
}


DEFAULT_MAX_NEW_TOKENS = 256
TINY_MAX_NEW_TOKENS = 48


def default_max_new_tokens(model: str) -> int:
    """A tiny random model never emits end-of-turn, so a short budget keeps the offline smoke run fast."""
    return TINY_MAX_NEW_TOKENS if model.startswith("tiny:") else DEFAULT_MAX_NEW_TOKENS


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="checkpoint path / hub id, or tiny:qwen3-vl | tiny:qwen2.5-vl")
    src.add_argument(
        "--generations", type=Path, help="JSONL with response, ground_truth[, benchmark, uid, ...]"
    )
    p.add_argument(
        "--bench",
        default="easy-vqa",
        help=f"comma-separated, or 'all'; offline: {', '.join(BENCHES)}; others read DATA_DIR/NAME.parquet",
    )
    p.add_argument(
        "--data-dir", type=Path, default=None, help="folder of `vlcal data bench` outputs (NAME.parquet)"
    )
    p.add_argument("--limit", type=int, default=None, help="items per benchmark")
    p.add_argument("--out", type=Path, required=True, help="report folder")
    p.add_argument("--backend", choices=("hf", "vllm"), default="hf")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help=f"default {DEFAULT_MAX_NEW_TOKENS}; {TINY_MAX_NEW_TOKENS} for tiny:* models (random weights never stop)",
    )
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--protocol", choices=("decoupled", "rlcr"), default="decoupled")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--judgments", type=Path, help="JSON {uid: 0|1} external visual judgments (S̃_vis agreement)"
    )


def _read_generations(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not valid JSON ({err.msg})") from None
            for key in ("response", "ground_truth"):
                if not isinstance(row, dict) or not isinstance(row.get(key), str):
                    raise ValueError(f"{path}:{n}: field {key!r} missing or not a string")
            rows.append(row)
    return rows


def _generate(args: argparse.Namespace) -> list[dict]:
    from vlcal_verl.data.easy_vqa import load_easy_vqa
    from vlcal_verl.evaluation.generate import (
        GenerationSettings,
        generate_hf,
        generate_vllm,
        load_bench_items,
        load_hf_model,
    )

    names = [b.strip() for b in args.bench.split(",") if b.strip()]
    data_dir = args.data_dir or Path(".")
    if names == ["all"]:  # every prepared benchmark in --data-dir
        names = sorted(p.stem for p in data_dir.glob("*.parquet"))
        if not names:
            raise ValueError(
                f"--bench all: no NAME.parquet in {data_dir} (run `vlcal data bench NAME --out DIR`)"
            )
    missing = [b for b in names if b not in BENCHES and not (data_dir / f"{b}.parquet").exists()]
    if missing:
        raise ValueError(
            f"--bench: {missing} not offline ({sorted(BENCHES)}) and no {data_dir}/NAME.parquet; "
            "prepare with `vlcal data bench NAME --out DIR` and pass --data-dir DIR"
        )
    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens or default_max_new_tokens(args.model),
        temperature=args.temperature,
        top_p=args.top_p,
        batch_size=args.batch_size,
        seed=args.seed,
        protocol=args.protocol,
    )
    model = processor = None
    if args.backend == "hf":
        model, processor = load_hf_model(args.model)
    rows: list[dict] = []
    for name in names:
        if name in BENCHES:
            items = load_easy_vqa("test", limit=args.limit, seed=args.seed, **BENCHES[name])
        else:
            items = load_bench_items(data_dir / f"{name}.parquet", limit=args.limit)
        if args.backend == "hf":
            texts = generate_hf(model, processor, items, settings)
        else:
            texts = generate_vllm(args.model, items, settings)
        for it, text in zip(items, texts, strict=True):
            rows.append(
                {
                    "benchmark": name,
                    "uid": it.uid,
                    "question": it.question,
                    "ground_truth": it.answer,
                    "answer_kind": it.kind,
                    "unanswerable": getattr(it, "unanswerable", it.data_source.endswith("-unanswerable")),
                    "response": text,
                }
            )
    return rows


def run(args: argparse.Namespace) -> int:
    from vlcal_verl.evaluation.generate import score_generations
    from vlcal_verl.evaluation.report import write_report

    try:
        rows = _read_generations(args.generations) if args.generations else _generate(args)
        judgments = json.loads(args.judgments.read_text()) if args.judgments else None
    except (OSError, ValueError) as err:
        print(f"vlcal eval: {err}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.generations:
        with open(args.out / "generations.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    records = score_generations(rows, protocol=args.protocol)
    title = f"vlcal eval — {args.model or args.generations.name}"
    metrics = write_report(records, args.out, title=title, judgments=judgments)
    print((args.out / "report.md").read_text(encoding="utf-8").split("\n![")[0])
    o = metrics["overall"] or {}
    print(f"wrote {args.out}/metrics.json, report.md, report.html ({o.get('n', 0)} answerable items)")
    return 0
