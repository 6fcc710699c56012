"""``vlcal train``: run the local engine (the embedded CPU demo) from a recipe.

    vlcal train --config recipes/tiny_cpu.yaml --out runs/demo [--resume] [local.rl_steps=30 ...]

The recipe's ``engine`` must be ``local``; the verl path is ``python -m vlcal_verl.main``.
"""

from __future__ import annotations

import argparse
import os
import warnings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="recipe YAML (engine/local/vlcal blocks)")
    parser.add_argument("--out", default="runs/local", help="output directory (metrics, checkpoints, report)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. local.rl_steps=30")


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # verl lists its optional GPU engines (megatron, torchtitan, ...) at import; irrelevant on this path
    warnings.filterwarnings("ignore", message=r".*engine is not available.*")
    from vlcal_verl.local.config import load_train_config
    from vlcal_verl.local.engine import LocalEngine

    cfg = load_train_config(args.config, args.overrides)
    result = LocalEngine(cfg, args.out, resume=args.resume).run()
    total = result.get("timings", {}).get("total_s")
    if total is not None:
        print(f"done in {total:.0f} s; outputs in {args.out}", flush=True)
    return 0
