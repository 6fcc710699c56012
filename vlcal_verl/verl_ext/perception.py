"""The perception-token loss filter inside verl's own actor loss (docs/design.md §4).

The authors' released run gives the policy-gradient loss only to each response's top ⌈20 %⌉ tokens
ranked by the clamped k3 KL between the original and the masked image; the KL-to-reference loss still
covers every response token. verl 0.9.1's ``ppo_loss`` (``verl/workers/utils/losses.py``) aggregates
both with one ``response_mask``, so the filter enters through two verl extension points and nothing of
verl's loss is copied:

1. a policy loss registered with ``core_algos.register_policy_loss`` as ``"vlcal_perception"``: verl's
   own ``vanilla`` policy loss (dual-clip PPO) evaluated with ``response_mask ∧ perception_mask`` and
   normalised by the number of *kept* tokens of the global mini-batch (what verl does with all tokens);
2. the actor's loss function wrapped by :class:`vlcal_verl.verl_ext.worker.VLCalTrainingWorker`
   (:func:`with_perception_mask`): it reads the micro-batch's ``vlcal_perception_mask`` field (written by
   the trainer after VCE) into a context variable for the duration of one verl ``ppo_loss`` call.

The trainer selects the mode (``actor.policy_loss.loss_mode=vlcal_perception``) when
``vlcal.perception.enabled``; ``actor/perception_token_fraction`` is logged per step.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import Any

import torch

PERCEPTION_FIELD = "vlcal_perception_mask"
"""TransferQueue field: [R] float 0/1 per response token, 1 = the token gets the policy-gradient loss."""
PERCEPTION_TOKENS_KEY = "vlcal_perception_tokens"
"""Non-tensor entry of an actor mini-batch: kept tokens summed over the mini-batch on every DP rank."""
LOSS_MODE = "vlcal_perception"

_KEPT: contextvars.ContextVar[tuple[torch.Tensor, float] | None] = contextvars.ContextVar(
    "vlcal_perception_kept", default=None
)


def perception_policy_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl's ``vanilla`` policy loss on the kept tokens only (see module docstring)."""
    from verl.trainer.ppo.core_algos import compute_policy_loss_vanilla

    state = _KEPT.get()
    if state is None:
        raise RuntimeError(
            f"policy loss {LOSS_MODE!r} needs the batch field {PERCEPTION_FIELD!r}: set "
            "vlcal.perception.enabled=true and run vlcal's trainer (python -m vlcal_verl.main)"
        )
    kept, kept_tokens = state
    mask = response_mask.bool() & kept.to(response_mask.device).bool()
    info = config.global_batch_info
    saved = dict(info)
    if info.get("batch_num_tokens") is not None:  # token-mean over the global mini-batch's kept tokens
        info["batch_num_tokens"] = max(kept_tokens, 1.0)
    try:
        loss, metrics = compute_policy_loss_vanilla(
            old_log_prob=old_log_prob,
            log_prob=log_prob,
            advantages=advantages,
            response_mask=mask,
            loss_agg_mode=loss_agg_mode,
            config=config,
            rollout_is_weights=rollout_is_weights,
        )
    finally:
        info.clear()
        info.update(saved)
    _record(old_log_prob, log_prob, advantages, response_mask, mask, kept_tokens, saved, loss, config)
    n_resp = float(response_mask.bool().sum())
    metrics["actor/perception_token_fraction"] = float(mask.sum()) / n_resp if n_resp else 0.0
    return loss, metrics


def _record(old_log_prob, log_prob, advantages, response_mask, kept, kept_tokens, info, loss, config) -> None:
    """The loop tests' recorder (:mod:`vlcal_verl.testing.recorder`; a no-op in real runs): one
    micro-batch's inputs and loss, so a test can recompute the loss by hand."""
    from vlcal_verl.testing import recorder

    if recorder.enabled():
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        clip = {k: config.get(k) for k in ("clip_ratio", "clip_ratio_low", "clip_ratio_high", "clip_ratio_c")}
        recorder.record(
            "policy_loss", rank=rank, old_log_prob=old_log_prob, log_prob=log_prob, advantages=advantages,
            response_mask=response_mask, kept=kept, kept_tokens=kept_tokens, batch_info=dict(info),
            loss=loss, clip=clip,
        )  # fmt: skip


def register_perception_loss() -> str:
    """Register :func:`perception_policy_loss` with verl's policy-loss registry (idempotent)."""
    from verl.trainer.ppo import core_algos

    registry = core_algos.POLICY_LOSS_REGISTRY
    if registry.get(LOSS_MODE) is not perception_policy_loss:
        registry.pop(LOSS_MODE, None)
        core_algos.register_policy_loss(LOSS_MODE)(perception_policy_loss)
    return LOSS_MODE


def kept_tokens_of(data: Any, dp_group: Any = None) -> float:
    """Sum of the perception mask over a mini-batch on every DP rank (an all-reduce, like verl's own
    ``batch_num_tokens``)."""
    field = data[PERCEPTION_FIELD]
    local = (field.values() if field.is_nested else field).float().sum()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        from verl.utils.device import get_device_id

        local = local.to(get_device_id())
        torch.distributed.all_reduce(local, op=torch.distributed.ReduceOp.SUM, group=dp_group)
    return float(local.item())


def with_perception_mask(loss_fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap verl's actor loss: micro-batches that carry :data:`PERCEPTION_FIELD` expose it (padded like
    verl pads ``response_mask``) and the mini-batch's kept-token count to the registered policy loss."""
    if getattr(loss_fn, "_vlcal_perception", False):
        return loss_fn

    def loss(*args: Any, **kwargs: Any) -> Any:
        data = kwargs.get("data", args[1] if len(args) > 1 else None)
        if data is None or PERCEPTION_FIELD not in data:
            return loss_fn(*args, **kwargs)
        from verl.utils import tensordict_utils as tu

        kept = data.select(PERCEPTION_FIELD).to_padded_tensor()[PERCEPTION_FIELD]
        kept_tokens = tu.get_non_tensor_data(data=data, key=PERCEPTION_TOKENS_KEY, default=None)
        if kept_tokens is None:
            kept_tokens = float(kept.sum())
        token = _KEPT.set((kept.bool(), float(kept_tokens)))
        try:
            return loss_fn(*args, **kwargs)
        finally:
            _KEPT.reset(token)

    loss._vlcal_perception = True  # type: ignore[attr-defined]
    return loss
