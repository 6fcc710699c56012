"""``vlcal data``: training data and benchmarks as verl parquet (one schema: ``vlcal_verl.data.schema``).

vlcal data virl --source PATH_OR_HUB_ID [--out DIR] [--n 12000] [--val-size 500] [--seed 0]
vlcal data bench NAME --out DIR [--source PATH] [--limit N] [--unanswerable]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

DATA_DIR_ENV = "VLCAL_DATA_DIR"
DATA_DIR_DEFAULT = "/shared/vlcal/data"  # the recipes' fallback: vlcal_verl/hydra_conf/vlcal_trainer.yaml
VIRL_DATASET = "vl_calibration_12k"


def default_virl_out() -> Path:
    """Where the recipes read the training data: ``$VLCAL_DATA_DIR/vl_calibration_12k``."""
    return Path(os.environ.get(DATA_DIR_ENV) or DATA_DIR_DEFAULT) / VIRL_DATASET


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_command", required=True)
    v = sub.add_parser("virl", help="ViRL-39K → 12K train + val parquet")
    v.add_argument("--source", default=None, help="local folder/file (parquet/JSONL + images/) or hub id")
    v.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"output folder (default ${DATA_DIR_ENV}/{VIRL_DATASET}, falling back to "
        f"{DATA_DIR_DEFAULT}/{VIRL_DATASET}: where the recipes read train/val.parquet)",
    )
    v.add_argument("--n", type=int, default=12_000)
    v.add_argument("--val-size", type=int, default=500)
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--keep-extremes", action="store_true", help="keep items with pass rate 0 or 1")
    b = sub.add_parser("bench", help="a benchmark → parquet")
    b.add_argument("name", help="benchmark name (see README); easy-vqa works offline")
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--source", type=Path, default=None, help="local copy in the hub's format")
    b.add_argument("--limit", type=int, default=None)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--unanswerable", action="store_true", help="blank every image (same size)")
    for q in (v, b):
        q.add_argument("--protocol", choices=("decoupled", "rlcr"), default="decoupled")
        q.add_argument(
            "--prompt-template",
            type=Path,
            default=None,
            help="Jinja file rendering {{ content }} (the question) instead of the built-in instructions "
            "(e.g. the authors' format prompt); also read from $VLCAL_PROMPT_TEMPLATE",
        )


def use_prompt_template(path: Path | None) -> None:
    """Validate ``--prompt-template`` and make it this process's template (ValueError when unusable)."""
    from vlcal_verl.protocol import PROMPT_TEMPLATE_ENV, load_prompt_template

    if path is not None:
        load_prompt_template(path)
        os.environ[PROMPT_TEMPLATE_ENV] = str(Path(path).resolve())
    elif os.environ.get(PROMPT_TEMPLATE_ENV):
        load_prompt_template(os.environ[PROMPT_TEMPLATE_ENV])


def run(args: argparse.Namespace) -> int:
    try:
        use_prompt_template(args.prompt_template)
        if args.data_command == "virl":
            from vlcal_verl.data.virl import prepare_virl

            m = prepare_virl(
                args.source,
                args.out if args.out is not None else default_virl_out(),
                n=args.n,
                val_size=args.val_size,
                seed=args.seed,
                keep_extremes=args.keep_extremes,
                protocol=args.protocol,
            )
        else:
            from vlcal_verl.data.benchmarks import benchmark_rows
            from vlcal_verl.data.schema import write_parquet

            rows = benchmark_rows(
                args.name,
                args.source,
                limit=args.limit,
                seed=args.seed,
                unanswerable=args.unanswerable,
                protocol=args.protocol,
            )
            suffix = "-unanswerable" if args.unanswerable and not args.name.endswith("-unanswerable") else ""
            fname = f"{args.name}{suffix}.parquet"
            m = {
                "benchmark": args.name + suffix,
                "rows": len(rows),
                "answer_kinds": {
                    k: sum(r["extra_info"]["answer_kind"] == k for r in rows)
                    for k in ("math", "multiple_choice", "yes_no")
                },
                "sha256": {fname: write_parquet(rows, args.out / fname)},
            }
            (args.out / f"{args.name}{suffix}.manifest.json").write_text(json.dumps(m, indent=2) + "\n")
    except (OSError, ValueError, RuntimeError) as err:
        print(f"vlcal data: {err}", file=sys.stderr)
        return 2
    print(json.dumps(m, indent=2))
    return 0
