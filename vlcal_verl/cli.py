"""The ``vlcal`` console script.

Each subcommand lives in its own module under ``vlcal_verl.commands`` exposing
``add_arguments(parser)`` and ``run(args) -> int``; modules import heavy dependencies (torch,
transformers, verl) inside ``run`` so that ``vlcal --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "score": ("vlcal_verl.commands.score", "score responses (JSONL) with the VL-Calibration reward"),
    "metrics": (
        "vlcal_verl.commands.metrics",
        "calibration metrics (ECE, AUROC, Brier, AURC) of a JSONL file",
    ),
    "train": (
        "vlcal_verl.commands.train",
        "train on the CPU backend: the embedded demo (warm start, verl GRPO, evaluation), or with "
        "--config recipes/tiny_science.yaml the science run (both arms per seed, held-out report)",
    ),
    "eval": ("vlcal_verl.commands.eval", "generate or score a benchmark and write a calibration report"),
    "judge": (
        "vlcal_verl.commands.judge",
        "ask a vision chat endpoint whether each <vision> description fits its image (--judgments file)",
    ),
    "export": (
        "vlcal_verl.commands.export",
        "convert a verl checkpoint (global_step_N/actor) to a HF folder",
    ),
    "data": ("vlcal_verl.commands.data", "prepare training data and benchmarks as verl parquet"),
    "serve": ("vlcal_verl.commands.serve", "run the reward server (alias of python -m reward_server)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlcal", description="VL-Calibration on verl")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:  # a subcommand whose module is not installed/built yet
            if err.name != module_name:
                raise
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
