"""``vlcal train``: the embedded demo — data, warm start, verl's GRPO run on the CPU backend, evaluation.

    vlcal train [--config recipes/tiny_cpu.yaml] [--out runs/demo] [--resume] [KEY=VALUE ...]
    vlcal train --config recipes/tiny_science.yaml --out runs/science [--seeds N] [--resume] [KEY=VALUE ...]

A recipe with a ``science:`` block runs the science pipeline (:mod:`vlcal_verl.science.pipeline`: one warm
start, verl's GRPO for the full method and the baseline, ``--seeds`` runs each, one report).

KEY=VALUE are Hydra overrides of the recipe, passed to verl's run as well (``trainer.total_training_steps=2
trainer.default_local_dir=/tmp/ckpt``, ``demo.warm_start_steps=20``). The GRPO step alone is
``python -m vlcal_verl.main --recipe recipes/tiny_cpu.yaml``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEFAULT_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "tiny_cpu.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_RECIPE,
        help="recipe YAML with a demo: block (default recipes/tiny_cpu.yaml; a science: block makes it the science run)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (demo.dir; default runs/demo, science recipes runs/science)",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue verl's run from its latest checkpoint"
    )
    parser.add_argument(
        "--seeds", type=int, default=None, help="science recipes: RL runs per arm (science.seeds), mean ± std"
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. trainer.total_training_steps=2")


def check_config_file(path: Path) -> str | None:
    """What is wrong with the recipe file as YAML (empty, not a mapping, no demo block), or None.

    An empty file would otherwise compose into verl's and the trainer's built-in defaults alone.
    """
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        return f"--config {path}: cannot read ({err.strerror or err})"
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        return f"--config {path}: not valid YAML{where} ({getattr(err, 'problem', None) or err})"
    example = f"e.g. --config {DEFAULT_RECIPE}"
    if data is None:
        return f"--config {path}: the file is empty; give a recipe with a demo: block, {example}"
    if not isinstance(data, dict):
        kind = type(data).__name__
        return (
            f"--config {path}: a recipe is a YAML mapping (key: value), this file holds a {kind}; {example}"
        )
    if "demo" not in data and "defaults" not in data:
        return f"--config {path}: no demo: block (and no defaults: to inherit one); {example}"
    return None


def has_science_block(path: Path) -> bool:
    """Whether the recipe file has a top-level ``science:`` block (then ``vlcal train`` runs the science
    pipeline instead of the demo)."""
    import yaml

    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return isinstance(data, dict) and "science" in data


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from vlcal_verl.demo.pipeline import run_demo

    if not args.config.is_file():
        print(f"vlcal train: --config: no such file: {args.config}", file=sys.stderr)
        return 2
    problem = check_config_file(args.config)
    if problem is not None:
        print(f"vlcal train: {problem}", file=sys.stderr)
        return 2
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        print(f"vlcal train: overrides must be KEY=VALUE, got {bad}", file=sys.stderr)
        return 2
    science = has_science_block(args.config)
    seeds = getattr(args, "seeds", None)
    if seeds is not None and (not science or seeds < 1):
        why = "must be >= 1" if science else f"needs a recipe with a science: block, {args.config} has none"
        print(f"vlcal train: --seeds {seeds}: {why}", file=sys.stderr)
        return 2
    if args.out is None:
        args.out = Path("runs/science" if science else "runs/demo")
    try:
        if science:
            from vlcal_verl.science.pipeline import run_science

            result = run_science(args.config, args.out, list(args.overrides), seeds=seeds, resume=args.resume)
        else:
            result = run_demo(args.config, args.out, list(args.overrides), resume=args.resume)
    except (ValueError, HydraException, OmegaConfBaseException) as err:  # bad recipe, key or value
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        print(f"vlcal train: {' '.join(lines[:2])}", file=sys.stderr)
        return 2
    total = result.get("timings", {}).get("total_s")
    if total is not None:
        print(f"done in {total:.0f} s; outputs in {args.out}", flush=True)
    return 0
