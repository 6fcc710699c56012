"""Checkpoints of the local engine, complete enough for an *exact* resume.

A checkpoint holds the policy weights, the AdamW state, every RNG state (Python, NumPy, torch CPU),
the RL step, the data-order state and the metric history used by the final plots. The rollout sampler
and the VCE masks are seeded from (seed, step, uid), so after loading, step k+1 sees the same prompts,
the same sampled responses and the same masks as an uninterrupted run, and produces the same loss.
Files: ``<out>/checkpoints/step_<k>.pt`` and ``latest.txt``; the warm-started weights (the frozen KL
reference and the "before RL" model) are saved once as ``<out>/checkpoints/warm_start.pt``.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    """Snapshot of the Python, NumPy and torch (CPU) random states."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_checkpoint(ckpt_dir: Path, step: int, model, optimizer, extra: dict[str, Any]) -> Path:
    """Write ``step_<step>.pt`` (model, optimizer, RNG states, step, ``extra``) and point ``latest.txt`` at it."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / f"step_{step}.pt"
    state = {
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": rng_state(),
        **extra,
    }
    _atomic_save(state, path)
    (ckpt_dir / "latest.txt").write_text(path.name + "\n", encoding="utf-8")
    return path


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The checkpoint ``latest.txt`` names, or None when there is none."""
    marker = ckpt_dir / "latest.txt"
    if not marker.exists():
        return None
    path = ckpt_dir / marker.read_text(encoding="utf-8").strip()
    if not path.exists():
        raise FileNotFoundError(f"{marker} names {path.name}, which does not exist")
    return path


def load_checkpoint(path: Path, model, optimizer) -> dict[str, Any]:
    """Restore model, optimizer and RNG states in place; return the whole checkpoint dict."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    return state


def save_weights(path: Path, model) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_save(model.state_dict(), path)


def load_weights(path: Path, model) -> None:
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
