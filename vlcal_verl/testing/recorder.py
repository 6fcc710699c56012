"""Test-only recorder: what the trainer and the actor workers hand each other inside verl's real loop.

The CPU loop tests (tests/verl_ext/test_verl_cpu_loop*.py) check that each VL-Calibration signal changes
what verl trains on — the rewards verl's advantage step reads, the advantages and perception mask the
actor's update reads, the policy loss it returns, the weights and Adam moments a resume restores. Those
values live in the Ray processes of the run, so the hooks in :mod:`vlcal_verl.verl_ext.trainer`,
:mod:`vlcal_verl.verl_ext.worker` and :mod:`vlcal_verl.verl_ext.perception` call :func:`record` /
:func:`record_batch`, which write ``torch.save`` files under ``$VLCAL_TEST_RECORD_DIR``.

Off (the variable unset, every production run) each call returns at its first line: nothing is read from
TransferQueue, nothing is copied or written, and no value the loop uses is touched.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ENV = "VLCAL_TEST_RECORD_DIR"
_COUNTER = itertools.count()


def enabled() -> bool:
    return bool(os.environ.get(ENV))


def _plain(value: Any) -> Any:
    """A detached CPU copy that unpickles without Ray, TransferQueue or a process group: nested tensors
    → lists of rows, DTensors → their local shard, NonTensorData/Stack → Python values."""
    import torch

    if isinstance(value, torch.Tensor):
        if getattr(value, "is_nested", False):
            return [row.detach().cpu().clone() for row in value.unbind()]
        local = value.to_local() if hasattr(value, "to_local") else value
        return local.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, str):
        return _plain(value.tolist())
    if hasattr(value, "data") and type(value).__name__.startswith("NonTensor"):
        return _plain(value.data)
    return value


def record(kind: str, **payload: Any) -> None:
    """Save ``payload`` (made plain) as ``<dir>/<kind>-<pid>-<n>.pt``; a no-op when recording is off."""
    root = os.environ.get(ENV)
    if not root:
        return
    import torch

    folder = Path(root)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(_plain(payload), folder / f"{kind}-{os.getpid()}-{next(_COUNTER):04d}.pt")


def record_batch(kind: str, batch: Any, fields: Iterable[str], **extra: Any) -> None:
    """Read ``fields`` (those the TransferQueue batch ``batch`` has) and :func:`record` them with the
    batch's padding flags; a no-op when recording is off."""
    if not enabled():
        return
    import transfer_queue as tq

    names = [f for f in fields if f in set(batch.fields)]
    data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=names)
    rows = {name: data[name] for name in names}
    padding = [bool(tag.get("is_padding", False)) for tag in batch.tags]
    record(kind, padding=padding, **rows, **extra)


def load(folder: Path, kind: str) -> list[dict]:
    """The records of ``kind`` under ``folder``, in the order they were written."""
    import torch

    files = sorted(Path(folder).glob(f"{kind}-*.pt"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))
    return [torch.load(f, weights_only=False) for f in files]


def by_row(rec: dict, fields: Iterable[str]) -> dict[tuple, dict]:
    """One record's rows keyed by (uid, session_id) — the rollout's identity across processes and
    re-orderings — each with the named fields (padding rows left out)."""
    uids = list(rec["uid"])
    sessions = list(rec.get("session_id") if rec.get("session_id") is not None else [0] * len(uids))
    padding = rec.get("padding") or [False] * len(uids)
    out = {}
    for i, (u, s) in enumerate(zip(uids, sessions, strict=True)):
        if not padding[i]:
            out[(str(u), int(s))] = {f: rec[f][i] for f in fields if f in rec}
    return out
