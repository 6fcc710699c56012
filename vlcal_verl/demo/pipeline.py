"""``vlcal train``: data → warm start → verl's GRPO run → ``vlcal eval`` → table and curves.

GRPO is ``python -m vlcal_verl.main --recipe RECIPE`` in a child process — the exact command a user runs,
with its own Ray head (started and stopped by verl's ``run_ppo``) — so the demo exercises the production
path and nothing else. The steps before and after it only read and write files under ``demo.dir``:

    data/          train.parquet, easy-vqa-heldout[-unanswerable].parquet   (verl parquet)
    warm_start/    the warm-started HF model (verl's initial policy and reference)
    verl/          verl's checkpoints: global_step_N/actor/{model shards, huggingface/}
    metrics/       verl's per-step metrics, one JSON-lines file per launch (verl's ``file`` logger)
    logs/          the GRPO run's stdout/stderr
    report/        after_warm_start/ and after_rl/ (``vlcal eval`` reports), curves.png, summary.md/json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vlcal_verl.demo.config import DemoConfig


def latest_hf_checkpoint(ckpt_dir: Path) -> Path | None:
    """``global_step_N/actor/huggingface`` of verl's latest checkpoint (``latest_checkpointed_iteration.txt``)."""
    marker = ckpt_dir / "latest_checkpointed_iteration.txt"
    if not marker.exists():
        return None
    hf = ckpt_dir / f"global_step_{int(marker.read_text().strip())}" / "actor" / "huggingface"
    return hf if (hf / "config.json").exists() else None


def check_out_dir(out: Path, ckpt_dir: Path, resume: bool) -> None:
    """Refuse to mix runs: a fresh run needs a fresh folder; ``--resume`` needs a checkpoint to resume."""
    has_ckpt = (ckpt_dir / "latest_checkpointed_iteration.txt").exists()
    if resume and not has_ckpt:
        raise ValueError(
            f"--resume: nothing to resume, no verl checkpoint under {ckpt_dir}; "
            "to start a fresh run, drop --resume"
        )
    if not resume and has_ckpt:
        raise ValueError(
            f"{out} already holds a run (checkpoint in {ckpt_dir}): pass --resume or a new --out"
        )


def grpo_command(recipe: Path, overrides: list[str], out: Path) -> list[str]:
    """The GRPO step as a user would type it (plus where Hydra keeps its own log)."""
    return [
        sys.executable, "-m", "vlcal_verl.main", "--recipe", str(recipe), *overrides,
        f"hydra.run.dir={out / 'logs' / 'hydra'}",
    ]  # fmt: skip


def run_grpo(cmd: list[str], out: Path) -> Path:
    """Run verl's GRPO in a child process, streaming its output to the console and ``logs/``."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / "metrics").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    metrics = out / "metrics" / f"verl-{stamp}.jsonl"
    env = dict(os.environ, VERL_FILE_LOGGER_PATH=str(metrics), TENSORBOARD_DIR=str(out / "tb"))
    print("GRPO (verl):", " ".join(cmd), flush=True)
    with open(out / "logs" / f"grpo-{stamp}.log", "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if _worth_showing(line):
                sys.stdout.write(line)
                sys.stdout.flush()
        rc = proc.wait()
    if rc != 0:
        raise RuntimeError(f"GRPO run failed (exit {rc}); its log: {log.name}")
    return metrics


def _worth_showing(line: str) -> bool:
    """verl's step lines, progress bar, checkpoints and errors; not its config dump or Ray's chatter."""
    keys = ("step:", "Training Progress", "Saving checkpoint", "Error", "error:", "Traceback", "[vlcal]")
    noise = ("WARNING", "Warning", "warnings.warn")
    return any(k in line for k in keys) and not any(n in line for n in noise)


def run_demo(recipe: Path, out: Path, overrides: list[str], resume: bool = False) -> dict[str, Any]:
    """The whole demo; returns {'rows': {phase: row}, 'table': str, 'timings': {...}}."""
    from vlcal_verl.main import compose_recipe

    t0 = time.perf_counter()
    out = out.resolve()
    overrides = [f"demo.dir={out}", *overrides]
    config = compose_recipe(recipe, overrides)  # a bad key or value fails here, before any work
    dc = demo_config_of(config)
    ckpt_dir = Path(str(config.trainer.default_local_dir))
    check_out_dir(out, ckpt_dir, resume)
    timings: dict[str, float] = {}
    warm, data_dir = prepare_assets(dc, out, timings)
    before = evaluate(
        dc, config, warm, data_dir, out / "report" / "after_warm_start", timings, "eval_before_s"
    )
    t = time.perf_counter()
    metrics_file = run_grpo(grpo_command(Path(recipe).resolve(), overrides, out), out)
    timings["grpo_s"] = time.perf_counter() - t
    trained = latest_hf_checkpoint(ckpt_dir)
    if trained is None:
        raise RuntimeError(
            f"no HF checkpoint under {ckpt_dir} (actor.checkpoint.save_contents needs hf_model)"
        )
    after = evaluate(dc, config, trained, data_dir, out / "report" / "after_rl", timings, "eval_after_s")
    timings["total_s"] = time.perf_counter() - t0
    return write_summary(out, {"after warm start": before, "after RL": after}, metrics_file, timings)


def demo_config_of(config: DictConfig) -> DemoConfig:
    block = config.get("demo")
    if block is None:
        raise ValueError("the recipe has no `demo:` block (see recipes/tiny_cpu.yaml)")
    return DemoConfig.from_dict(OmegaConf.to_container(block, resolve=True))


def prepare_assets(dc: DemoConfig, out: Path, timings: dict[str, float]) -> tuple[Path, Path]:
    """Data parquet and the warm-started model (both reused when present)."""
    from vlcal_verl.demo.data import load_demo_data, write_demo_parquets
    from vlcal_verl.demo.warm_start import warm_started_model

    t = time.perf_counter()
    data = load_demo_data(dc.train_size, dc.eval_size, dc.seed, dc.image_size)
    write_demo_parquets(data, out / "data")
    warm = warm_started_model(dc, data.train, out / "warm_start")
    timings["data_and_warm_start_s"] = time.perf_counter() - t
    return warm, out / "data"


def evaluate(
    dc: DemoConfig, config: DictConfig, model: Path, data_dir: Path, out: Path, timings: dict, key: str
) -> dict[str, Any]:
    """``vlcal eval`` on the held-out benchmark and its image-removed copy; returns the table row."""
    from vlcal_verl.demo.data import HELDOUT
    from vlcal_verl.demo.evaluate import run_vlcal_eval, summary_row

    t = time.perf_counter()
    benches = [HELDOUT, f"{HELDOUT}-unanswerable"] if dc.eval_size else []
    row: dict[str, Any] = {}
    if benches:
        max_new = int(config.data.max_response_length)  # the training response length: no cut-off tags
        row = summary_row(run_vlcal_eval(model, data_dir, benches, out, max_new_tokens=max_new, cfg=dc))
        (out / "summary_row.json").write_text(json.dumps(row, indent=2), encoding="utf-8")
    timings[key] = time.perf_counter() - t
    return row


def write_summary(out: Path, rows: dict[str, dict], metrics_file: Path, timings: dict) -> dict[str, Any]:
    """``report/summary.md`` / ``summary.json`` / ``curves.png``; prints the table."""
    from vlcal_verl.demo.evaluate import format_table, plot_curves, read_verl_metrics

    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    history = read_verl_metrics(sorted((out / "metrics").glob("verl-*.jsonl")))
    plot_curves(history, report / "curves.png")
    table = format_table(rows)
    spans = [h.get("vce/span_rate") for h in history]
    notes = (
        f"GRPO steps (verl): {len(history)}; steps with vision spans: {sum(bool(s) for s in spans if s)}; "
        f"last metrics: {metrics_file.name}"
    )
    (report / "summary.md").write_text(f"{table}\n\n{notes}\n", encoding="utf-8")
    summary = {"rows": rows, "table": table, "timings": timings, "grpo_steps": len(history)}
    (report / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print(f"\n{table}\n\n{notes}\nreport: {report}", flush=True)
    return summary
