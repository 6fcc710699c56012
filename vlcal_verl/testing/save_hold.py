"""Test-only: hold a checkpoint save open, so a test can kill a run while step N's checkpoint is half written.

``VLCAL_TEST_HOLD_SAVE=<step>:<folder>`` (reaching the actor workers through the run's Ray runtime env):
when verl's trainer saves ``global_step_<step>``, each actor rank first writes its shard through verl's
own ``save_checkpoint`` (``global_step_<step>/actor`` exists on disk), then touches ``<folder>/held-<rank>``
and waits until ``<folder>/release`` exists. verl writes ``data.pt`` and ``latest_checkpointed_iteration.txt``
only after every rank returned, so a job killed while held leaves exactly what a crash mid-save leaves: a
step folder without its data.pt, and a tracker still naming the step before.

Off (the variable unset, every production run) :func:`hold_if_asked` returns at its first line.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

ENV = "VLCAL_TEST_HOLD_SAVE"
POLL_S = 0.2


def parse(value: str) -> tuple[int, Path]:
    """``"<step>:<folder>"`` → (step, folder)."""
    step, _, folder = value.partition(":")
    if not step.isdigit() or not folder:
        raise ValueError(f"{ENV}={value!r}: expected '<step>:<folder>'")
    return int(step), Path(folder)


def hold_if_asked(global_step: int, rank: int) -> None:
    """Block this rank's save of ``global_step`` until ``<folder>/release`` exists, when asked to."""
    value = os.environ.get(ENV)
    if not value:
        return
    step, folder = parse(value)
    if int(global_step) != step:
        return
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"held-{rank}").touch()
    while not (folder / "release").exists():
        time.sleep(POLL_S)
