"""The demo's evaluation: ``vlcal eval`` on a checkpoint, the before/after table, the training curves.

Both evaluations are the ``vlcal eval`` command itself (same parser, same code), on the held-out parquet
the demo wrote, so the demo's table and a user's ``vlcal eval`` of the same checkpoint cannot disagree.
The curves are read from verl's own metrics (its ``file`` logger: one JSON line per step).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TABLE_ROWS = (
    ("parse rate", "parse_rate"),
    ("accuracy", "accuracy"),
    ("ECE", "ece"),
    ("AUROC", "auroc"),
    ("Brier", "brier"),
    ("mean c_v", "mean_vision_confidence"),
    ("mean c_r", "mean_reasoning_confidence"),
    ("unanswerable conf. gap", "unanswerable_gap"),
)

CURVE_PANELS = (
    ("reward (batch mean)", ("critic/score/mean",)),
    ("rollouts: accuracy, parse rate", ("calib/accuracy", "calib/parse_rate")),
    ("S̃_vis (mean, std) and mean c_v", ("vce/s_tilde/mean", "vce/s_tilde/std", "calib/c_v_mean")),
    ("TAR weights on reweighted tokens", ("tar/weight_mean", "tar/weight_min", "tar/weight_max")),
)
"""(title, verl metric keys) of each panel of ``curves.png``."""


def run_vlcal_eval(
    model_dir: Path,
    data_dir: Path,
    benches: Sequence[str],
    out: Path,
    *,
    max_new_tokens: int,
    cfg: Any,
    protocol: str = "decoupled",
) -> dict[str, Any]:
    """``vlcal eval --model MODEL_DIR --data-dir DATA_DIR --bench ... --out OUT --protocol PROTOCOL``;
    return its metrics."""
    import argparse

    from vlcal_verl.commands import eval as eval_cmd

    parser = argparse.ArgumentParser()
    eval_cmd.add_arguments(parser)
    args = parser.parse_args(
        [
            "--model", str(model_dir),
            "--data-dir", str(data_dir),
            "--bench", ",".join(benches),
            "--out", str(out), "--overwrite",  # a resumed demo evaluates into the same folders again
            "--max-new-tokens", str(max_new_tokens),
            "--temperature", str(cfg.eval_temperature),
            "--batch-size", str(cfg.eval_batch_size),
            "--seed", str(cfg.seed),
            "--protocol", protocol,
        ]
    )  # fmt: skip
    if eval_cmd.run(args) != 0:
        raise RuntimeError(f"vlcal eval failed on {model_dir}")
    return json.loads((out / "metrics.json").read_text(encoding="utf-8"))


def summary_row(report: dict[str, Any]) -> dict[str, float | None]:
    """The table's numbers, read from ``vlcal eval``'s ``overall`` block."""
    overall = report.get("overall") or {}
    return {key: overall.get(key) for _, key in TABLE_ROWS}


def format_table(rows: dict[str, dict[str, float | None]]) -> str:
    """Markdown table: one column per phase (e.g. 'after warm start', 'after RL')."""
    names = list(rows)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, key in TABLE_ROWS:
        cells = []
        for n in names:
            v = rows[n].get(key)
            cells.append(
                "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{float(v):.3f}"
            )
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def read_verl_metrics(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """verl ``file``-logger lines ``{"step": N, "data": {...}}`` of one or more runs (a resumed run writes
    its own file), one dict per step with ``step`` added; a later file wins for a repeated step."""
    by_step: dict[int, dict[str, Any]] = {}
    for path in paths:
        if not Path(path).exists():
            continue
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                by_step[int(row["step"])] = {**row["data"], "step": int(row["step"])}
    return [by_step[k] for k in sorted(by_step)]


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    """Per-GRPO-step curves from verl's metrics (2×2 PNG, :data:`CURVE_PANELS`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), constrained_layout=True)
    for ax, (title, keys) in zip(axes.flat, CURVE_PANELS, strict=True):
        for key in keys:
            ys = [_finite(h.get(key)) for h in history]
            if any(not math.isnan(y) for y in ys):
                ax.plot(steps, ys, marker=".", label=key)
        ax.set_title(title)
        ax.set_xlabel("GRPO step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _finite(value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return math.nan
    return v if math.isfinite(v) else math.nan
