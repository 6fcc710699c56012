"""``VLCalActorRolloutRefWorker``: verl 0.9.1's hybrid actor/rollout/ref worker plus ``compute_vce``.

VCE must use the *current* policy's weights, which live as FSDP shards in the actor worker (docs/design.md
§6), so the masked-image pass is a method of the actor worker, registered on the actor mesh with the
same dispatch as verl's ``compute_log_prob``: the trainer passes the TransferQueue batch handle, each
DP rank gets its share, and the returned per-token ``vce_kl`` / ``vce_entropy`` go back to
TransferQueue. The forward itself runs through verl's engine (:mod:`vlcal_verl.verl_ext.vce_engine`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from tensordict import TensorDict
from verl.single_controller.base.decorator import Dispatch, make_nd_compute_dataproto_dispatch_fn, register
from verl.utils import tensordict_utils as tu
from verl.utils.config import omega_conf_to_dataclass
from verl.utils.profiler import DistProfiler
from verl.workers.engine_workers import ActorRolloutRefWorker, TrainingWorker

from vlcal_verl.config import VCEConfig
from vlcal_verl.testing import recorder, save_hold
from vlcal_verl.vce_mask import black_pixel, black_row_for
from vlcal_verl.verl_ext.model_config import install_dummy_vision_forward
from vlcal_verl.verl_ext.nested import dense_rows, renest_position_ids
from vlcal_verl.verl_ext.perception import (
    PERCEPTION_FIELD,
    PERCEPTION_TOKENS_KEY,
    kept_tokens_of,
    register_perception_loss,
    with_perception_mask,
)
from vlcal_verl.verl_ext.vce_engine import SPAN_FIELD, prepare_vce_batch, vce_forward_installed


def mask_ids_of(data: TensorDict, by_tokens: bool = False) -> list[str]:
    """One mask seed id per rollout: ``{uid}_{session_id}`` (uid alone is shared by the GRPO group).

    ``by_tokens`` (``rollout.full_determinism``): a digest of the rollout's ``input_ids`` (prompt and
    response) instead — verl draws uids with ``uuid4``, so a rerun or a resumed run would mask the same
    rollout differently."""
    if by_tokens:
        ids = data["input_ids"]
        rows = ids.unbind() if getattr(ids, "is_nested", False) else list(ids)
        return [hashlib.sha256(r.cpu().numpy().astype("int64").tobytes()).hexdigest()[:16] for r in rows]
    uids = tu.get(data, "uid")
    if uids is None or len(uids) != len(data):
        raise ValueError(f"compute_vce: batch field 'uid' must hold one id per sample ({len(data)})")
    sessions = tu.get(data, "session_id")
    if sessions is None:
        return [str(u) for u in uids]
    sessions = sessions.tolist() if hasattr(sessions, "tolist") else list(sessions)
    return [f"{u}_{s}" for u, s in zip(uids, sessions, strict=True)]


def image_constants(model_config: Any) -> tuple[Any, int]:
    """(black value, spatial merge size m) of a VLM's ``HFModelConfig``: Qwen-VL's black ``pixel_values``
    row and ``spatial_merge_size``; InternVL's black pixel [C] and 1 / ``downsample_ratio`` (2)."""
    processor = getattr(model_config, "processor", None)
    hf_config = getattr(model_config, "hf_config", None)
    vision = getattr(hf_config, "vision_config", None)
    if processor is None or vision is None:
        raise ValueError(
            "compute_vce needs a vision-language model: actor_rollout_ref.model has no "
            "processor/vision_config"
        )
    if getattr(hf_config, "downsample_ratio", None) is not None:  # InternVL
        ip = processor.image_processor
        return black_pixel(ip.image_mean, ip.image_std), round(1 / float(hf_config.downsample_ratio))
    return black_row_for(processor), int(vision.spatial_merge_size)


def patch_size_of(model_config: Any) -> int:
    """The vision tower's patch side (InternVL configs give [h, w])."""
    patch = model_config.hf_config.vision_config.patch_size
    return int(patch[0] if isinstance(patch, list | tuple) else patch)


def needs_patch_size(model_config: Any, cfg: VCEConfig) -> bool:
    """Pixel-square masks need the patch side; so do InternVL's tiles (28-px cells = 14-px patches × 2)."""
    return bool(cfg.mask_cell_px) or getattr(model_config.hf_config, "downsample_ratio", None) is not None


def vce_config_of(data: TensorDict) -> VCEConfig:
    """The VCE settings the trainer put on the batch (``extra_info["vlcal_vce"]``)."""
    raw = tu.get(data, "vlcal_vce")
    if raw is None:
        raise ValueError("compute_vce: the batch carries no 'vlcal_vce' settings (set by VLCalTrainer)")
    return VCEConfig(**dict(raw))


def open_cpu_process_group() -> None:
    """On the CPU platform, open a plain gloo group before verl opens its own.

    verl's ``initialize_global_process_group_ray`` builds the backend string ``cpu:gloo,{device}:{backend}``,
    which on a CPU is ``cpu:gloo,cpu:gloo`` — torch rejects the duplicate device. verl opens a group only
    when none exists (``torch.distributed.is_initialized()``), so opening ``gloo`` first is enough. (verl's
    stock workers get the same from Ray's setup hook, :mod:`vlcal_verl.verl_ext.cpu_backend.process_group`;
    after it this call is a no-op.)
    """
    from vlcal_verl.verl_ext.cpu_backend import cpu_backend_requested

    if cpu_backend_requested():
        from verl.utils.distributed import initialize_global_process_group_ray

        initialize_global_process_group_ray(timeout_second=None, backend="gloo")


class VLCalTrainingWorker(TrainingWorker):
    """verl's ``TrainingWorker`` (the actor's and the reference's engine holder) with two additions:

    - a guard against one TransferQueue trap: when every sample on a DP rank has the same length, the
      3-D position ids arrive nested along the wrong axis and verl's ``seqlen_balancing`` /
      ``index_select`` crash (:func:`vlcal_verl.verl_ext.nested.renest_position_ids` repairs them);
    - the perception filter's plumbing (:mod:`vlcal_verl.verl_ext.perception`): the loss verl sets is
      wrapped so it can read the batch's perception mask, and each mini-batch gets its global kept-token
      count before verl's engine runs it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        register_perception_loss()  # the policy loss must be known in this (worker) process
        super().__init__(*args, **kwargs)

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def reset(self) -> None:
        """verl's engine set-up, then InternVL's dummy vision forward on image-less micro-batches (FSDP
        needs every rank to gather the vision tower alike; :func:`install_dummy_vision_forward`)."""
        super().reset()
        module = getattr(self.engine, "module", None)
        if module is not None:
            install_dummy_vision_forward(module)

    def set_loss_fn(self, loss_fn: Any) -> None:
        super().set_loss_fn(with_perception_mask(loss_fn) if loss_fn is not None else None)

    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="train"), blocking=False)
    def train_batch(self, data: TensorDict) -> TensorDict | None:
        kept = None
        if PERCEPTION_FIELD in data:
            kept = kept_tokens_of(data, self.engine.get_data_parallel_group())
            tu.assign_non_tensor(data, **{PERCEPTION_TOKENS_KEY: kept})
        if recorder.enabled():  # the loop tests: what the actor's update reads (off in real runs)
            fields = ("advantages", "response_mask", "old_log_probs", PERCEPTION_FIELD)
            recorder.record(
                "actor_batch", rank=self.engine.get_data_parallel_rank(), kept_global=kept,
                uid=tu.get(data, "uid"), session_id=tu.get(data, "session_id"),
                **{k: data[k] for k in fields if k in data},
            )  # fmt: skip
        return super().train_batch(data)

    def infer_batch(self, data: TensorDict, *args: Any, **kwargs: Any) -> TensorDict | None:
        renest_position_ids(data)
        return super().infer_batch(data, *args, **kwargs)

    def train_mini_batch(self, data: TensorDict, *args: Any, **kwargs: Any) -> TensorDict | None:
        renest_position_ids(data)
        return super().train_mini_batch(data, *args, **kwargs)


class VLCalActorRolloutRefWorker(ActorRolloutRefWorker):
    """``ActorRolloutRefWorker`` + :meth:`compute_vce`; its actor and reference engines live in
    :class:`VLCalTrainingWorker` (verl's ``actor_worker_cls`` / ``ref_worker_cls`` extension points)."""

    actor_worker_cls = VLCalTrainingWorker
    ref_worker_cls = VLCalTrainingWorker
    _vce_constants: tuple[Any, int] | None = None
    _vce_model_config: Any = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        open_cpu_process_group()

    def _model_config(self) -> Any:
        if self._vce_model_config is None:  # builds tokenizer and processor: once per worker
            self._vce_model_config = omega_conf_to_dataclass(self.config.model)
        return self._vce_model_config

    def _image_constants(self) -> tuple[Any, int]:
        if self._vce_constants is None:
            self._vce_constants = image_constants(self._model_config())
        return self._vce_constants

    def _patch_size(self, cfg: VCEConfig) -> int | None:
        model_config = self._model_config()
        return patch_size_of(model_config) if needs_patch_size(model_config, cfg) else None

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def load_checkpoint(self, local_path, hdfs_path=None, del_local_after_load=False):
        """verl's; with the loop tests' recorder on, this rank's weights and optimizer state as loaded."""
        out = super().load_checkpoint(local_path, hdfs_path, del_local_after_load)
        if recorder.enabled():
            engine = self.actor.engine
            recorder.record(
                "actor_after_load", path=str(local_path), rank=engine.get_data_parallel_rank(),
                model=engine.module.state_dict(), optimizer=engine.optimizer.state_dict(),
            )  # fmt: skip
        return out

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def save_checkpoint(self, local_path, hdfs_path=None, global_step=0, max_ckpt_to_keep=None):
        """verl's; the cluster tests may hold it open after this rank's files are written
        (:mod:`vlcal_verl.testing.save_hold`, off unless its variable is set)."""
        out = super().save_checkpoint(local_path, hdfs_path, global_step, max_ckpt_to_keep)
        save_hold.hold_if_asked(global_step, self.actor.engine.get_data_parallel_rank())
        return out

    def _masks_by_tokens(self) -> bool:
        """``rollout.full_determinism`` of this worker's config (masks seeded by the rollout's tokens)."""
        config = getattr(self, "config", None) or {}  # a worker built bare (unit tests) has none
        return bool(config.get("rollout", {}).get("full_determinism", False))

    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="actor"))
    def compute_log_prob(self, data: TensorDict) -> TensorDict | None:
        """verl's ``compute_log_prob``; when the trainer put VCE settings on the batch (fused VCE), the
        same call also returns ``vce_masked_logp`` (and ``vce_kl`` / ``vce_entropy`` for ``exact``)
        from one masked forward per micro-batch (:mod:`vlcal_verl.verl_ext.vce_fused`)."""
        if tu.get(data, "vlcal_vce") is None:
            return super().compute_log_prob(data)
        from vlcal_verl.verl_ext.vce_fused import add_vce_targets, fused_forward_installed

        cfg = vce_config_of(data)
        black, merge = self._image_constants()
        patch = self._patch_size(cfg)
        add_vce_targets(
            data, dense_rows(data[SPAN_FIELD]).long().cpu(), cfg, mask_ids_of(data, self._masks_by_tokens())
        )
        with fused_forward_installed(self.actor.engine, cfg, black, merge, patch):
            return super().compute_log_prob(data)

    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="actor"))
    @DistProfiler.annotate(color="purple", role="actor_compute_vce")
    def compute_vce(self, data: TensorDict) -> TensorDict | None:
        """Masked-image forward on this rank's share → ``vce_kl``, ``vce_entropy`` jagged [B, R_b].

        Reads the batch's ``input_ids``, ``position_ids``, ``prompts``, ``responses``,
        ``multi_modal_inputs``, ``uid``/``session_id`` (mask seeds) and ``vlcal_vision_span`` [B, 2].
        """
        cfg = vce_config_of(data)
        black, merge = self._image_constants()
        # prepare_vce_batch rebuilds position ids row by row (nested_rows), so no re-nesting is needed here
        spans = dense_rows(data[SPAN_FIELD]).long().cpu()  # TransferQueue returns [B, 2] as jagged
        patch = self._patch_size(cfg)
        prepared = prepare_vce_batch(
            data, spans, cfg, black, merge, mask_ids_of(data, self._masks_by_tokens()), patch
        )
        tu.assign_non_tensor(prepared, compute_loss=False, calculate_entropy=False)
        with vce_forward_installed(self.actor.engine, cfg):
            output = self.actor.infer_batch(prepared)
        return output.cpu() if output is not None else None


def registered_methods(cls: type = VLCalActorRolloutRefWorker) -> Sequence[str]:
    """Names of the methods verl's worker group will expose (carry verl's dispatch attribute)."""
    from verl.single_controller.base.decorator import MAGIC_ATTR

    return [n for n in dir(cls) if hasattr(getattr(cls, n, None), MAGIC_ATTR)]
