"""VCE inside verl's old-log-prob pass: one actor call, one masked forward per micro-batch.

verl's trainer computes the old log-probs (and entropy) with an original forward of every sequence. The
fused pass makes that same forward yield VCE's original distribution: while verl's own
``forward_step`` runs (unchanged, called as verl defines it), a pre-hook on the output embedding keeps
the final hidden states of the rows that predict the target tokens (the vision span for the ``exact``
estimator; nothing at all for the sampled-token estimators, which read verl's log-probs instead). Then
the masked forward runs on the same micro-batch — truncated at each span end, or over the whole response
for the authors' variant; the kept rows join the masked rows in its one LM-head call (FSDP has the head's
weights gathered there), and :func:`vlcal_verl.verl_ext.vce_engine.masked_pass` turns both into
KL_t / H_t / log p_masked(y_t). verl's ``log_probs`` / ``entropy`` and the VCE fields come back from the
one ``compute_log_prob`` call and reach TransferQueue together.

Against the separate ``compute_vce`` call this saves the original forward of the truncated sequences
(exact) and a second pass over verl's micro-batching; only [targets × hidden] rows are kept between the
two forwards, never logits, and every DP rank runs the same forwards in the same micro-batches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

import torch
from tensordict import NonTensorStack, TensorDict

from vlcal_verl.config import VCEConfig
from vlcal_verl.verl_ext.vce_engine import (
    _default_device,
    add_targets,
    masked_pass,
    needs_original_forward,
    pick_rows,
    target_rows,
    truncated_masked,
)

MASK_ID_FIELD = "vlcal_mask_id"
LENGTH_FIELD = "vce_len"


def add_vce_targets(data: TensorDict, spans: torch.Tensor, cfg: VCEConfig, mask_ids: Sequence[str]) -> None:
    """Per sample, the masked forward's length, the target range and the mask seed id (in place): what
    each micro-batch needs to build its own masked forward."""
    data[LENGTH_FIELD] = add_targets(data, spans, cfg)
    data[MASK_ID_FIELD] = NonTensorStack(*[str(m) for m in mask_ids])


def masked_micro_batch(
    micro_batch: TensorDict, cfg: VCEConfig, black: torch.Tensor, merge_size: int, patch_size: int | None
) -> TensorDict:
    """The micro-batch of the masked forward: ids / positions cut to ``vce_len``, masked images."""
    ids = [getattr(m, "data", m) for m in micro_batch[MASK_ID_FIELD]]
    lens = micro_batch[LENGTH_FIELD].tolist()
    return truncated_masked(micro_batch, lens, cfg, black, merge_size, ids, patch_size)


@contextlib.contextmanager
def keep_target_hidden(
    model: Any, b_idx: torch.Tensor, col: torch.Tensor, remove_padding: bool
) -> Iterator[list]:
    """During one forward, keep the final hidden states at (b_idx, col) — the LM head's input rows that
    predict the target tokens ([N, d], a copy; the head itself still sees every row, as verl needs)."""
    inner = getattr(model, "module", model)
    head = inner.get_output_embeddings()
    kept: list[torch.Tensor] = []

    def hook(_module, args):
        kept.append(pick_rows(args[0], b_idx, col, remove_padding).detach())  # indexing copies

    handle = head.register_forward_pre_hook(hook)
    try:
        yield kept
    finally:
        handle.remove()


def fused_forward_step(
    engine: Any,
    micro_batch: TensorDict,
    loss_function: Any = None,
    forward_only: bool = True,
    *,
    cfg: VCEConfig,
    black: torch.Tensor,
    merge_size: int,
    patch_size: int | None = None,
    device: Any = None,
) -> tuple[torch.Tensor, dict]:
    """verl's own ``forward_step`` (its log-probs / entropy untouched) + the masked pass on the same
    micro-batch; the VCE fields join verl's ``model_output``."""
    from verl.utils import tensordict_utils as tu

    device = _default_device(device)
    remove_padding = bool(tu.get_non_tensor_data(data=micro_batch, key="use_remove_padding", default=True))
    verl_step = type(engine).forward_step  # the class's step: the instance attribute is this function
    if needs_original_forward(cfg):
        b_idx, _, col = target_rows(micro_batch, remove_padding)
        with keep_target_hidden(engine.module, b_idx, col, remove_padding) as kept:
            loss, output = verl_step(engine, micro_batch, loss_function, forward_only)
        if len(kept) != 1:
            raise RuntimeError(f"fused VCE: expected one LM-head call in verl's forward, saw {len(kept)}")
        orig = kept[0]
    else:
        loss, output = verl_step(engine, micro_batch, loss_function, forward_only)
        orig = None
    masked = masked_micro_batch(micro_batch, cfg, black, merge_size, patch_size)
    output["model_output"].update(masked_pass(engine, masked, cfg, device, orig_hidden=orig))
    return loss, output


@contextlib.contextmanager
def fused_forward_installed(
    engine: Any,
    cfg: VCEConfig,
    black: torch.Tensor,
    merge_size: int,
    patch_size: int | None = None,
    device: Any = None,
) -> Iterator[None]:
    """Make ``engine.forward_step`` the fused step for one call (instance attribute; class untouched)."""
    engine.forward_step = partial(
        fused_forward_step,
        engine,
        cfg=cfg,
        black=black,
        merge_size=merge_size,
        patch_size=patch_size,
        device=device,
    )
    try:
        yield
    finally:
        del engine.forward_step
