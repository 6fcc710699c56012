"""``VLCalTrainer``: verl 0.9.1's V1 synchronous PPO trainer plus the VL-Calibration steps.

It subclasses :class:`verl.trainer.ppo.v1.PPOTrainerSync` and overrides step hooks only — ``fit`` and
``_step_once`` stay verl's (docs/design.md §6):

- ``_init_resource_pool_mgr``: the actor role runs :class:`VLCalActorRolloutRefWorker` (adds
  ``compute_vce``) instead of verl's ``ActorRolloutRefWorker``;
- ``_compute_old_log_prob``: after verl's old log-probs, log calibration metrics from the reward
  components, then (VCE on) find the vision spans on the response ids, run ``compute_vce`` on the actor
  mesh, compute S̃_vis over the global batch and add w_vis·(−(c_v − S̃_vis)²) to ``rm_scores``;
  With the perception filter on, also write each response's kept-token mask (``vlcal_perception_mask``),
  which the actor's loss reads (:mod:`vlcal_verl.verl_ext.perception`);
- ``_compute_advantage``: after verl's GRPO advantages, apply TAR.

The rollout batch lives in TransferQueue; the methods here only move fields in and out of it and call
the pure functions of :mod:`vlcal_verl.verl_ext.batch`.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict
from typing import Any

import ray
import torch
import transfer_queue as tq
from omegaconf import OmegaConf
from tensordict import TensorDict
from verl.trainer.ppo.utils import Role
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.utils.debug import marked_timer
from verl.workers.utils.padding import response_to_nested

from reward_server.client import step_metrics as reward_client_metrics
from vlcal_verl.config import VLCalConfig
from vlcal_verl.spans import vision_token_spans
from vlcal_verl.testing import recorder
from vlcal_verl.token_signals import k3_clamped, perception_mask, tar_token_signals, vce_token_signals
from vlcal_verl.verl_ext.batch import (
    calibration_step_metrics,
    span_mask_from_tensor,
    spans_to_tensor,
    tar_step,
    visual_reward_step,
)
from vlcal_verl.verl_ext.nested import dense_rows
from vlcal_verl.verl_ext.perception import PERCEPTION_FIELD
from vlcal_verl.verl_ext.vce_engine import SPAN_FIELD, needs_original_forward

MASKED_LOGP_FIELD = "vce_masked_logp"
EXACT_FIELDS = ("vce_kl", "vce_entropy")
"""TransferQueue fields written by ``compute_vce``, response-aligned: log p_masked(y_t) always; the
full-vocabulary KL_t and H_t with the ``exact`` estimator."""
_ACTOR_ROLES = (Role.Actor, Role.ActorRollout, Role.ActorRolloutRef)
# what the loop tests' recorder keeps (vlcal_verl.testing.recorder; off unless VLCAL_TEST_RECORD_DIR is set)
_ROW_IDS = ("uid", "session_id")
_VCE_RECORD = (*_ROW_IDS, "response_mask", "old_log_probs", MASKED_LOGP_FIELD, *EXACT_FIELDS, "entropy",
               SPAN_FIELD, "extra_fields", PERCEPTION_FIELD)  # fmt: skip
_ADV_RECORD = (*_ROW_IDS, "rm_scores", "response_mask")


def vlcal_config_from(config: Any) -> VLCalConfig:
    """The validated ``vlcal:`` block of a Hydra/OmegaConf config (unknown keys are an error)."""
    block = config.get("vlcal") if hasattr(config, "get") else None
    raw = OmegaConf.to_container(block, resolve=True) if block is not None else {}
    return VLCalConfig.from_dict(raw)


def _padded(nested: torch.Tensor, pad: float = 0.0) -> torch.Tensor:
    return nested.to_padded_tensor(pad) if nested.is_nested else nested


def _reward_infos(extra_fields: Any) -> list[dict]:
    """Per-sample reward components (verl's ``extra_fields["reward_extra_info"]``)."""
    out = []
    for ef in list(extra_fields):
        ef = getattr(ef, "data", ef)
        info = ef.get("reward_extra_info", {}) if isinstance(ef, dict) else {}
        out.append(dict(info or {}))
    return out


def _row_lengths(nested: torch.Tensor) -> torch.Tensor | None:
    """[B] lengths of a jagged field's rows (None for a dense field: every row is full width)."""
    return nested.offsets().diff().cpu() if nested.is_nested else None


def put_fields(batch: Any, fields: TensorDict) -> Any:
    """Write ``fields`` to TransferQueue and return the handle that lists them.

    ``tq.kv_batch_put`` returns a new ``KVBatchMeta`` whose ``fields`` include the written ones; verl's
    worker-side bridge fetches only listed fields, so a handle kept from before the write would make
    ``compute_vce`` miss them (``KeyError``). The new handle carries the old one's ``tags`` (verl's
    padding flags) and ``extra_info`` (batch-level settings the workers read) over.
    """
    written = tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=fields)
    return dataclasses.replace(batch, fields=list(written.fields))


class VLCalTrainer(PPOTrainerSync):
    """V1 sync PPO trainer with VCE visual rewards and TAR (see module docstring)."""

    def __init__(self, config):
        self.vlcal = vlcal_config_from(config)
        super().__init__(config)

    # ------------------------------------------------------------------ wiring
    def _init_resource_pool_mgr(self):
        super()._init_resource_pool_mgr()
        from vlcal_verl.verl_ext.worker import VLCalActorRolloutRefWorker

        for role in _ACTOR_ROLES:
            if role in self.role_worker_mapping:
                self.role_worker_mapping[role] = ray.remote(VLCalActorRolloutRefWorker)

    # ------------------------------------------------------------------ hooks
    def _vce_fused(self) -> bool:
        """VCE inside verl's old-log-prob pass — unless verl skips that pass (rollout-correction bypass)."""
        rc = self.config.algorithm.get("rollout_correction", None) if "algorithm" in self.config else None
        bypass = bool(rc and rc.get("bypass_mode", False))
        return self.vlcal.vce.enabled and self.vlcal.vce.fused and not bypass

    def _compute_old_log_prob(self, batch, metrics: dict):
        self._vlcal_check_images(batch)
        fused = self._vce_fused()
        if fused:  # spans first (they need only the response ids), then one actor call for both
            t0 = time.perf_counter()
            batch = self._vlcal_spans(batch)
            batch.extra_info["vlcal_vce"] = asdict(self.vlcal.vce)
            metrics["vce/span_time_s"] = time.perf_counter() - t0
        asked = batch
        try:
            batch = super()._compute_old_log_prob(batch, metrics)
        finally:
            asked.extra_info.pop("vlcal_vce", None)
            batch.extra_info.pop("vlcal_vce", None)
        self._vlcal_calibration_metrics(batch, metrics)
        recorder.record_batch("scores_before_vce", batch, (*_ROW_IDS, "rm_scores"), step=self.global_steps)
        if self.vlcal.vce.enabled:
            timing = getattr(self, "timing_raw", {})
            with marked_timer("vce", timing, color="purple"):
                batch = self._vlcal_visual_reward(batch, metrics, run_vce=not fused)
            recorder.record_batch("vce", batch, _VCE_RECORD, step=self.global_steps)
        return batch

    def _compute_advantage(self, batch, metrics: dict):
        recorder.record_batch("advantage_in", batch, _ADV_RECORD, step=self.global_steps)
        batch = super()._compute_advantage(batch, metrics)
        if self.vlcal.tar.enabled:
            batch = self._vlcal_tar(batch, metrics)
        return batch

    # ------------------------------------------------------------------ guards
    _vlcal_images_checked = False

    def _vlcal_images_expected(self) -> bool:
        """Whether the training data carries images (the first rows of ``data.image_key``)."""
        frame = getattr(getattr(self, "train_dataset", None), "dataframe", None)
        key = self.config.data.get("image_key", "images")
        if frame is None or key not in (getattr(frame, "column_names", None) or []):
            return False
        return any(bool(frame[i][key]) for i in range(min(len(frame), 8)))

    def _vlcal_check_images(self, batch) -> None:
        """First step only: data with images must reach the actor as ``multi_modal_inputs``. Without a
        processor for the model verl's own dataset refuses image rows, but a custom dataset class could
        pass them on and the agent loop would drop the images: VCE, TAR and the policy would then train
        a vision-language model text-only."""
        if self._vlcal_images_checked:
            return
        self._vlcal_images_checked = True
        if not self._vlcal_images_expected():
            return
        data = tq.kv_batch_get(
            keys=batch.keys, partition_id=batch.partition_id, select_fields=["multi_modal_inputs"]
        )
        rows = [getattr(m, "data", m) for m in data["multi_modal_inputs"]]
        if not any(isinstance(m, dict) and m.get("pixel_values") is not None for m in rows):
            raise RuntimeError(
                f"the training data has images ({self.config.data.get('image_key', 'images')}) but none reached "
                "the trainer as multi_modal_inputs: verl built no processor for "
                f"{self.config.actor_rollout_ref.model.path}, so this run would train text-only. Keep "
                "actor_rollout_ref.model._target_=vlcal_verl.verl_ext.model_config.VLCalModelConfig "
                "and use a Qwen-VL or an HF-format InternVL checkpoint."
            )

    # ------------------------------------------------------------------ steps
    def _signal_fields(self) -> list[str]:
        """The TransferQueue fields the configured signals read (verl's ``entropy`` only when some H_t is
        the distribution entropy, VCE's ``vce_kl`` only for the exact estimator)."""
        v, t = self.vlcal.vce, self.vlcal.tar
        fields = ["old_log_probs", MASKED_LOGP_FIELD]
        if v.entropy == "distribution" or (t.enabled and t.entropy == "distribution"):
            fields.append("entropy")
        if needs_original_forward(v):
            fields.append(EXACT_FIELDS[0])
        return fields

    def _signals(self, data: Any) -> dict[str, torch.Tensor | None]:
        """The padded [B, R] per-token inputs of :mod:`vlcal_verl.token_signals`."""
        keys = set(data.keys())
        return {
            "old_logp": _padded(data["old_log_probs"]).float(),
            "masked_logp": _padded(data[MASKED_LOGP_FIELD]).float(),
            "exact_kl": _padded(data["vce_kl"]).float() if "vce_kl" in keys else None,
            "entropy": _padded(data["entropy"]).float() if "entropy" in keys else None,
        }

    @staticmethod
    def _valid_rows(batch) -> torch.Tensor:
        return torch.tensor([not tag.get("is_padding", False) for tag in batch.tags], dtype=torch.bool)

    def _vlcal_calibration_metrics(self, batch, metrics: dict) -> None:
        data = tq.kv_batch_get(
            keys=batch.keys, partition_id=batch.partition_id, select_fields=["extra_fields"]
        )
        valid = self._valid_rows(batch).tolist()
        infos = [i for i, ok in zip(_reward_infos(data["extra_fields"]), valid, strict=True) if ok]
        metrics.update(calibration_step_metrics(infos))
        metrics.update(reward_client_metrics(infos))  # reward_client/* when scored by the reward server

    def _vlcal_spans(self, batch):
        """Vision spans of the response ids → the ``vlcal_vision_span`` field."""
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=["responses"])
        responses = [r.cpu().numpy() for r in data["responses"].unbind()]
        spans = spans_to_tensor(vision_token_spans(responses, self.tokenizer))
        return put_fields(batch, TensorDict({SPAN_FIELD: spans}, batch_size=len(batch)))

    def _vlcal_visual_reward(self, batch, metrics: dict, run_vce: bool = True):
        """(Spans → ``compute_vce`` on the actor mesh, unless the old-log-prob pass did it) → S̃_vis over
        the batch → visual term into ``rm_scores``."""
        t0 = time.perf_counter()
        if run_vce:
            batch = self._vlcal_spans(batch)
            batch.extra_info.update(
                {
                    "vlcal_vce": asdict(self.vlcal.vce),
                    "temperature": self.config.actor_rollout_ref.rollout.temperature,
                }
            )
            try:
                output = self.actor_rollout_wg.compute_vce(batch)
                assert len(output) == len(batch)
            finally:
                batch.extra_info.pop("vlcal_vce", None)
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=[SPAN_FIELD])
        spans = dense_rows(data[SPAN_FIELD]).cpu().long()

        fields = ["rm_scores", "response_mask", "extra_fields", *self._signal_fields()]
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)
        response_mask_nt = data["response_mask"]
        response_mask = _padded(response_mask_nt)
        signals = self._signals(data)
        kl, ent = vce_token_signals(self.vlcal.vce, **signals)
        span_mask = span_mask_from_tensor(spans, response_mask)
        c_v = [i.get("vision_confidence") for i in _reward_infos(data["extra_fields"])]
        new_scores, s_tilde, vce_metrics = visual_reward_step(
            _padded(data["rm_scores"]).float(),
            response_mask,
            c_v,
            kl,
            ent,
            span_mask,
            w_vis=self.vlcal.reward.w_vis,
            vce_cfg=self.vlcal.vce,
            valid=self._valid_rows(batch),
            response_lengths=_row_lengths(response_mask_nt),
        )
        new_fields = {"rm_scores": response_to_nested(new_scores, response_mask_nt)}
        if self.config.trainer.get("rollout_data_dir"):  # S̃_vis per rollout beside verl's generation dump
            from vlcal_verl.science.rollouts import write_step_rows

            write_step_rows(
                self.config.trainer.rollout_data_dir, self.global_steps, batch, s_tilde, c_v, self.tokenizer
            )
        if self.vlcal.perception.enabled:
            keep = perception_mask(
                k3_clamped(signals["old_logp"], signals["masked_logp"]),
                response_mask,
                self.vlcal.perception.top_fraction,
            ) & self._valid_rows(batch).unsqueeze(-1)
            new_fields[PERCEPTION_FIELD] = response_to_nested(keep.float(), response_mask_nt)
            vce_metrics["vce/perception_token_fraction"] = float(keep.sum()) / max(
                float((response_mask.bool() & self._valid_rows(batch).unsqueeze(-1)).sum()), 1.0
            )
        batch = put_fields(batch, TensorDict(new_fields, batch_size=len(batch)))
        metrics.update(vce_metrics)
        metrics["vce/time_s"] = time.perf_counter() - t0
        return batch

    def _vlcal_tar(self, batch, metrics: dict):
        """TAR on the advantages verl just wrote (vision-span tokens with A_t < 0)."""
        fields = ["advantages", "response_mask", SPAN_FIELD, *self._signal_fields()]
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)
        response_mask_nt = data["response_mask"]
        response_mask = _padded(response_mask_nt)
        span_mask = span_mask_from_tensor(dense_rows(data[SPAN_FIELD]).cpu().long(), response_mask)
        kl, ent = tar_token_signals(self.vlcal.tar, self.vlcal.vce, **self._signals(data))
        new_adv, stats = tar_step(
            _padded(data["advantages"]),
            kl,
            ent,
            span_mask,
            response_mask,
            self.vlcal.tar,
            valid=self._valid_rows(batch),
        )
        batch = put_fields(
            batch,
            TensorDict({"advantages": response_to_nested(new_adv, response_mask_nt)}, batch_size=len(batch)),
        )
        metrics.update(stats)
        return batch
