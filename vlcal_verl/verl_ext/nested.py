"""Jagged tensors as verl 0.9.1 and TransferQueue hand them around, built and read correctly.

verl keeps per-sample fields as jagged nested tensors ``[B, j]`` (``torch.jagged`` layout). Two traps:

- **Which dimension is ragged.** ``torch.nested.as_nested_tensor`` infers it. For Qwen-VL's 3-D
  position ids (rows ``[4, n_b]``) it picks ``n`` when the lengths differ, but the constant ``4`` when
  every ``n_b`` is equal (a GRPO group shares one prompt; every response cut at max length). verl's
  ``maybe_fix_3d_position_ids`` then sets the ragged index to 2 on offsets that count rows of 4, and the
  engine's ``index_select`` crashes. :func:`nested_rows` states the ragged (last) dimension explicitly;
  :func:`renest_position_ids` repairs a batch that TransferQueue delivered the wrong way round.
- **Fixed-width fields come back jagged.** A ``[B, 2]`` field written to TransferQueue is read back as a
  nested ``[B, j]``; :func:`dense_rows` turns it back into the dense tensor (slicing a nested tensor
  fails with "slice(): not supported for NestedTensor").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tensordict import TensorDict

POSITION_IDS = "position_ids"


def nested_rows(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """Jagged nested tensor of ``rows``, ragged along each row's **last** dimension.

    1-D rows ``[n_b]`` → ``[B, j]``; 2-D rows ``[C, n_b]`` (3-D position ids, C = 4) → ``[B, C, j]``.
    """
    if not rows:
        raise ValueError("nested_rows: no rows")
    if rows[0].dim() == 1:
        lengths = torch.tensor([r.shape[0] for r in rows])
        values = torch.cat(list(rows))
        return torch.nested.nested_tensor_from_jagged(values, offsets=_offsets(lengths))
    if rows[0].dim() != 2 or any(r.shape[0] != rows[0].shape[0] for r in rows):
        raise ValueError(
            f"nested_rows: rows must all be [n] or all [C, n]; got {[tuple(r.shape) for r in rows]}"
        )
    lengths = torch.tensor([r.shape[1] for r in rows])
    values = torch.cat(list(rows), dim=1)  # [C, total]
    return torch.nested.nested_tensor_from_jagged(values, offsets=_offsets(lengths), jagged_dim=2)


def _offsets(lengths: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.zeros(1, dtype=torch.long), lengths.long().cumsum(0)])


def dense_rows(t: torch.Tensor) -> torch.Tensor:
    """``[B, W]`` dense tensor of a field whose rows all have width W (nested or already dense)."""
    if not getattr(t, "is_nested", False):
        return t
    rows = t.unbind()
    return torch.stack(list(rows)) if rows else torch.zeros(0, 0, dtype=t.dtype)


def position_ids_misnested(pos: torch.Tensor) -> bool:
    """3-D position ids nested along the constant dimension (``[B, j, n]`` with ragged index 1)."""
    return bool(getattr(pos, "is_nested", False) and pos.dim() == 3 and pos._ragged_idx == 1)


def renest_position_ids(data: TensorDict) -> bool:
    """Make 3-D ``position_ids`` ``[B, 4, j]`` ragged along the sequence (in place); True if changed.

    A dense ``[B, 4, L]`` field (every sample the same length) and one nested along the constant
    dimension are both rebuilt from their rows; a correctly nested field is left alone.
    """
    pos = data.get(POSITION_IDS, None)
    if pos is None or pos.dim() != 3:
        return False
    if getattr(pos, "is_nested", False) and not position_ids_misnested(pos):
        return False
    data[POSITION_IDS] = nested_rows(list(pos.unbind()))
    return True
