"""Metric sinks of the local engine: stdout, a JSONL file and TensorBoard, behind one ``log`` call.

The JSONL file (``<out>/metrics.jsonl``, one ``{"step", "phase", ...metrics}`` object per line) is the
source of the per-step curves; on ``--resume`` it is truncated to the resumed step, so a resumed run's
file equals an uninterrupted run's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

STDOUT_KEYS = (
    "reward/mean",
    "reward/accuracy",
    "reward/parse_ok",
    "vce/s_vis_mean",
    "adv/nonzero_frac",
    "tar/weight_mean",
    "actor/loss",
)


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class MetricLogger:
    """Append metrics to ``metrics.jsonl``, TensorBoard (optional) and, for RL steps, one stdout line."""

    def __init__(self, out_dir: Path, tensorboard: bool = True, resume_step: int | None = None):
        self.path = out_dir / "metrics.jsonl"
        out_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            keep = [r for r in self.read() if not (r.get("phase") == "rl" and r["step"] > resume_step)]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out_dir / "tb"))

    def log(self, metrics: dict[str, float], step: int, phase: str = "rl", echo: bool = False) -> None:
        row = {"phase": phase, "step": step, **{k: _clean(v) for k, v in metrics.items()}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.writer.add_scalar(k, v, step)
        if echo:
            shown = " ".join(
                f"{k.split('/')[-1]}={metrics[k]:.3f}" for k in STDOUT_KEYS if _num(metrics.get(k))
            )
            print(f"[{phase} {step}] {shown}", flush=True)

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line]

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)
