"""Run ``python -m vlcal_verl.main`` (verl's own loop) in a child process, as the CPU loop tests do.

Each run gets its own Ray temp dir; every process whose command line names it is stopped afterwards
(:func:`vlcal_verl.testing.ray_local.stop_processes_under`), whatever the run's outcome. Results are read
from verl's own outputs: its ``file`` logger (one JSON line per step), rollout dumps and checkpoints.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from vlcal_verl.testing import recorder
from vlcal_verl.testing.ray_local import new_ray_temp_dir, private_ray_env, stop_processes_under

RUN_TIMEOUT_S = 1200
"""One run's limit: 2 GRPO steps take 5–7 min alone on 2 cores, up to ~10 min beside other work."""
LOOP_TEST_TIMEOUT_S = 2400
"""pytest-timeout for a loop test item (its fixtures included): a warm start (2–5 min) and two runs fit
with margin on a loaded CI machine."""


def record_dir(metrics: Path) -> Path:
    """Where the run that logs to ``metrics`` (``metrics-<k>.jsonl``) records (:mod:`..recorder`)."""
    return metrics.parent / f"record-{metrics.stem.split('-')[1]}"


def run_verl(
    root: Path,
    name: str,
    overrides: list[str],
    *,
    recipe: Path | None = None,
    expect_ok: bool = True,
    record: bool = False,
) -> tuple[Path, Path, str]:
    """One run under ``root/name``; returns (metrics jsonl, checkpoint dir, output). With ``expect_ok`` a
    non-zero exit fails with the log tail; with ``record`` the trainer and workers record what they hand
    each other under :func:`record_dir` (:mod:`vlcal_verl.testing.recorder`)."""
    from vlcal_verl.commands.train import DEFAULT_RECIPE

    out = root / name
    out.mkdir(exist_ok=True)
    metrics = out / f"metrics-{len(list(out.glob('metrics-*')))}.jsonl"
    ckpt = out / "ckpt"
    temp = new_ray_temp_dir()
    cmd = [
        sys.executable, "-m", "vlcal_verl.main", "--recipe", str(recipe or DEFAULT_RECIPE),
        f"demo.dir={root}", f"trainer.default_local_dir={ckpt}", f"trainer.rollout_data_dir={out / 'dump'}",
        f"+ray_kwargs.ray_init._temp_dir={temp}", f"hydra.run.dir={out / 'hydra'}", *overrides,
    ]  # fmt: skip
    env = private_ray_env() | {"VERL_FILE_LOGGER_PATH": str(metrics)}
    env.pop(recorder.ENV, None)
    if record:
        env[recorder.ENV] = str(record_dir(metrics))
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    finally:
        stop_processes_under(temp)
    log = proc.stdout + proc.stderr
    (out / f"{metrics.stem}.log").write_text(log, encoding="utf-8")
    if expect_ok:
        assert proc.returncode == 0, (
            f"verl run {name} failed (exit {proc.returncode}; full log {out / f'{metrics.stem}.log'}):\n"
            f"{crash_excerpt(log)}{log[-6000:]}"
        )
    return metrics, ckpt, log


# what a Ray worker prints when it dies of a signal (Python's faulthandler; Ray's C++ handler writes
# "*** SIGSEGV received at …") or what Ray says when its memory monitor kills one; the driver's traceback
# only says "the actor died", and the worker's lines are far above the log's tail. Not a bare "SIGSEGV":
# Ray's generic ActorDiedError text names it ("crashed unexpectedly due to SIGSEGV or …") for any death.
_CRASH_MARKERS = ("Fatal Python error", "Segmentation fault", "*** SIG", "OutOfMemoryError")


def crash_excerpt(log: str, before: int = 5, after: int = 40) -> str:
    """The lines around the first worker crash report in ``log`` (``before`` lines above, ``after`` below),
    headed for an assertion message; "" when the log holds none."""
    lines = log.splitlines()
    for i, line in enumerate(lines):
        if any(m in line for m in _CRASH_MARKERS):
            block = "\n".join(lines[max(0, i - before) : i + after])
            return f"--- first crash report (log line {i + 1}) ---\n{block}\n--- log tail ---\n"
    return ""


def steps_of(metrics: Path) -> list[dict]:
    """verl's ``file`` logger lines: ``{"step": k, "data": {metric: value}}``."""
    return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]


def finite(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def rl_dataset(parquet: Path, processor):
    """verl's own ``RLHFDataset`` over ``parquet`` as the loop reads it (prompt + images, no filtering): what
    the tests compare the warm start's prompts with."""
    from omegaconf import OmegaConf
    from verl.utils.dataset.rl_dataset import RLHFDataset

    conf = OmegaConf.create(
        {
            "prompt_key": "prompt",
            "image_key": "images",
            "max_prompt_length": 1024,
            "filter_overlong_prompts": False,
        }
    )
    return RLHFDataset(str(parquet), processor.tokenizer, conf, processor=processor)
