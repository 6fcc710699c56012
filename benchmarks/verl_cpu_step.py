"""Seconds per GRPO step of verl's real loop on this CPU, split by phase, for the demo and science settings.

Each setting gets the demo's data and warm start (``vlcal_verl.demo.pipeline.prepare_assets``, as ``vlcal
train`` builds them, in its own folder) and then ``python -m vlcal_verl.main --recipe recipes/tiny_cpu.yaml``
for a few steps in a child process with a private Ray (no checkpoint, no validation). The timings are
verl's own: the ``timing_s/*`` metrics of its ``file`` logger (one JSON line per step), where

- generation = ``timing_s/gen`` (the rollout: HF ``generate`` on the rollout replica),
- old log-prob = ``timing_s/old_log_prob`` (the actor's log-probs and entropy; with VCE fused, the
  masked-image pass too, in the same actor call; ``timing_s/vce``, nested in it, is only the driver's
  part after that call — S̃_vis over the batch and the visual term — shown on its own line),
- reference = ``timing_s/ref``, update = ``timing_s/update_actor``,
- rest = ``timing_s/step`` minus those four (reward, advantages + TAR, pushing weights to the rollout,
  the driver's bookkeeping).

Step 1 pays one-off costs (lazy inits, first allocations), so the table shows the mean of steps 2.. and
step 1 on its own line. Settings:

- **demo**: ``recipes/tiny_cpu.yaml`` as ``make demo`` runs it (real Qwen tokenizer, 4 prompts × 4 = 16
  rollouts of ≤ 96 tokens);
- **science**: the step settings of ``recipes/tiny_science.yaml`` on the demo's data and warm start size:
  the small tokenizer (``+demo.tokenizer=small``, ~660 tokens), 8 prompts × 4 = 32 rollouts of ≤ 96
  tokens, 4,096-token micro-batch budgets, two PPO mini-batches of 4 prompts per step.

Usage: ``python benchmarks/verl_cpu_step.py [--steps 3] [--out runs/bench-cpu-step] [--settings demo
science] [--warm-start-steps N]`` — about 6 minutes on a 2-core machine once both
warm starts exist (the first run builds them: ~2 minutes for the demo's on an idle machine). Anything after
``--`` is a Hydra override for every setting.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "tiny_cpu.yaml"
SETTINGS: dict[str, list[str]] = {
    "demo": [],
    # the step-time keys of recipes/tiny_science.yaml: 8 prompts × 4, larger token budgets per micro-batch
    # (the small vocabulary's logits are ~230× smaller), two PPO mini-batches of 4 prompts per step
    "science": [
        "+demo.tokenizer=small",
        "data.train_batch_size=8",
        "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=4096",
        "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=4096",
        "actor_rollout_ref.ref.log_prob_max_token_len_per_gpu=4096",
    ],
}
# every setting: no checkpoint and no validation inside the timed steps
COMMON = ["trainer.save_freq=-1", "trainer.test_freq=-1", "trainer.val_before_train=false"]
PHASES = (
    ("generation", "gen"),
    ("old log-prob (+ fused VCE)", "old_log_prob"),
    ("reference", "ref"),
    ("update", "update_actor"),
)
EXIT_USAGE = 2


# ----------------------------------------------------------------------------- reading verl's metrics
def read_steps(metrics_file: Path) -> list[dict]:
    """verl's ``file`` logger lines ``{"step": k, "data": {...}}`` that carry a step time, by step."""
    rows = [json.loads(line) for line in Path(metrics_file).read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "timing_s/step" in r.get("data", {})]
    return sorted(steps, key=lambda r: r["step"])


def step_phases(data: dict) -> dict[str, float]:
    """One step's seconds per phase (``PHASES``, ``vce``, ``rest``, ``step``) from its metrics dict."""
    out = {name: float(data.get(f"timing_s/{key}", 0.0)) for name, key in PHASES}
    out["driver-side VCE (part of old log-prob)"] = float(data.get("timing_s/vce", 0.0))
    out["step"] = float(data["timing_s/step"])
    out["rest"] = out["step"] - sum(out[name] for name, _ in PHASES)
    return out


def summarize(steps: list[dict]) -> dict[str, float]:
    """Mean per phase over steps 2.. (step 1 alone when it is the only one), plus step 1's total and the
    mean prompt/response lengths (verl's ``prompt_length/mean``, ``response_length/mean``)."""
    if not steps:
        raise ValueError("no step with timing_s/step in the metrics")
    timed = steps[1:] or steps
    per = [step_phases(s["data"]) for s in timed]
    out = {k: statistics.fmean(p[k] for p in per) for k in per[0]}
    out["step 1"] = float(steps[0]["data"]["timing_s/step"])
    out["steps averaged"] = len(timed)
    for key in ("prompt_length/mean", "response_length/mean"):
        out[key] = statistics.fmean(float(s["data"].get(key, 0.0)) for s in timed)
    return out


ROWS = [name for name, _ in PHASES] + [
    "driver-side VCE (part of old log-prob)",
    "rest",
    "step",
    "step 1",
    "prompt_length/mean",
    "response_length/mean",
]


def format_table(columns: dict[str, dict[str, float]], extra: dict[str, dict[str, str]] | None = None) -> str:
    """Markdown table: one row per phase, one column per setting (seconds, one decimal)."""
    names = list(columns)
    lines = ["| per GRPO step | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for label, values in (extra or {}).items():
        lines.append(f"| {label} | " + " | ".join(values.get(n, "") for n in names) + " |")
    for row in ROWS:
        unit = "tokens" if "length" in row else "s"
        label = {"step": "**step (mean of steps 2..)**", "step 1": "step 1 (warm-up)"}.get(row, row)
        cells = []
        for n in names:
            v = columns[n].get(row)
            cells.append("" if v is None else (f"**{v:.1f}**" if row == "step" else f"{v:.1f}"))
        lines.append(f"| {label} ({unit}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- running verl
def prepare(setting_dir: Path, overrides: list[str]) -> tuple[dict, float]:
    """Data + warm start as ``vlcal train`` builds them; returns (facts about the setting, seconds)."""
    from vlcal_verl.demo.pipeline import demo_config_of, prepare_assets
    from vlcal_verl.main import compose_recipe

    config = compose_recipe(RECIPE, [f"demo.dir={setting_dir}", *overrides])
    dc = demo_config_of(config)
    t = time.perf_counter()
    warm, _ = prepare_assets(dc, setting_dir, {})
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(warm).text_config.vocab_size
    facts = {
        "tokenizer": f"{dc.tokenizer} ({vocab:,} embeddings)",
        "rollouts": f"{config.data.train_batch_size} × {config.actor_rollout_ref.rollout.n}",
        "max response": f"{config.data.max_response_length} tokens",
    }
    return facts, time.perf_counter() - t


def run_loop(setting_dir: Path, overrides: list[str], steps: int, timeout_s: int) -> Path:
    """``python -m vlcal_verl.main`` for ``steps`` steps; returns verl's metrics file. Every process of
    its private Ray is stopped afterwards, whatever the outcome."""
    from vlcal_verl.testing.ray_local import new_ray_temp_dir, private_ray_env, stop_processes_under

    metrics = setting_dir / "metrics" / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    metrics.parent.mkdir(parents=True, exist_ok=True)
    temp = new_ray_temp_dir()
    cmd = [
        sys.executable, "-m", "vlcal_verl.main", "--recipe", str(RECIPE), f"demo.dir={setting_dir}",
        f"trainer.total_training_steps={steps}", f"trainer.default_local_dir={setting_dir / 'verl'}",
        f"+ray_kwargs.ray_init._temp_dir={temp}", f"hydra.run.dir={setting_dir / 'logs' / 'hydra'}",
        *COMMON, *overrides,
    ]  # fmt: skip
    log = setting_dir / "logs" / f"{metrics.stem}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = private_ray_env() | {"VERL_FILE_LOGGER_PATH": str(metrics)}
    try:
        with open(log, "w", encoding="utf-8") as fh:
            rc = subprocess.run(
                cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout_s
            ).returncode
    finally:
        stop_processes_under(temp)
    if rc != 0:
        tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-40:])
        raise RuntimeError(f"verl run failed (exit {rc}); log {log}:\n{tail}")
    return metrics


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="GRPO steps per setting (>= 2)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-cpu-step")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), help=f"from {list(SETTINGS)}")
    parser.add_argument("--warm-start-steps", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per verl run")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every setting (after --)")
    args = parser.parse_args(argv)
    unknown = [s for s in args.settings if s not in SETTINGS]
    if unknown:
        parser.exit(EXIT_USAGE, f"error: unknown setting(s) {unknown}; known: {list(SETTINGS)}\n")
    if args.steps < 2:
        parser.exit(EXIT_USAGE, f"error: --steps must be >= 2 (step 1 is warm-up), got {args.steps}\n")
    if args.warm_start_steps is not None and args.warm_start_steps < 0:
        parser.exit(EXIT_USAGE, f"error: --warm-start-steps must be >= 0, got {args.warm_start_steps}\n")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    extra = list(args.overrides)
    if args.warm_start_steps is not None:
        extra.append(f"demo.warm_start_steps={args.warm_start_steps}")
    columns: dict[str, dict[str, float]] = {}
    facts: dict[str, dict[str, str]] = {}
    for name in args.settings:
        setting_dir = (args.out / name).resolve()
        overrides = [*SETTINGS[name], *extra]
        print(f"[{name}] data + warm start in {setting_dir}", flush=True)
        about, prep_s = prepare(setting_dir, overrides)
        print(f"[{name}] prepared in {prep_s:.0f} s; verl: {args.steps} steps", flush=True)
        t, load_before = time.perf_counter(), os.getloadavg()[0]
        metrics = run_loop(setting_dir, overrides, args.steps, args.timeout)
        columns[name] = summarize(read_steps(metrics))
        about["verl run (start-up + steps)"] = f"{time.perf_counter() - t:.0f} s"
        # the machine may be shared: the 1-minute load average before and after the run
        about["load average (1 min)"] = f"{load_before:.1f} → {os.getloadavg()[0]:.1f}"
        facts[name] = about
        print(f"[{name}] done: {metrics}", flush=True)
    load = os.getloadavg()
    columns = {k: columns[k] for k in SETTINGS if k in columns}  # the table's order, whatever the run's
    print(f"\n{format_table(columns, _transpose(facts))}\n")
    print(
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}, {os.cpu_count()} CPUs, load average {load[0]:.1f}/{load[1]:.1f}"
    )


def _transpose(facts: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    """{setting: {label: value}} → {label: {setting: value}} for the table's header rows."""
    out: dict[str, dict[str, str]] = {}
    for setting, about in facts.items():
        for label, value in about.items():
            out.setdefault(label, {})[setting] = value
    return out


if __name__ == "__main__":
    main()
