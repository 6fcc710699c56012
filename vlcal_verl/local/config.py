"""Typed configuration of the local engine: the ``local:`` block next to the shared ``vlcal:`` block.

A recipe (``recipes/tiny_cpu.yaml``) has ``engine: local``, a ``local:`` block (this module's
:class:`LocalConfig`) and the same ``vlcal:`` block (:class:`vlcal_verl.config.VLCalConfig`) that the verl
path reads, so the algorithm settings mean the same thing on both engines. Command-line overrides are
``key=value`` dotted paths (``local.rl_steps=2``, ``vlcal.tar.enabled=false``), values parsed as YAML.
Unknown keys are errors that name the key.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vlcal_verl.config import RewardConfig, TARConfig, VCEConfig, VLCalConfig


@dataclass
class LocalConfig:
    """Settings of the single-process engine (model, rollouts, optimisation, warm start, evaluation)."""

    model_family: str = "qwen3-vl"
    """Tiny model family built on the spot by ``testing.tiny_models`` ('qwen3-vl' | 'qwen2.5-vl')."""
    seed: int = 0
    """Seeds the model init, the data order, the rollout sampler and the VCE masks."""
    # --- data
    train_size: int = 512
    """Training questions drawn from the easy-vqa train split."""
    eval_size: int = 48
    """Held-out questions drawn from the easy-vqa test split (plus as many unanswerable copies)."""
    image_size: int = 128
    """Images are resized (nearest) to this square size; easy-vqa's 64 px give only 2×2 merged Qwen3-VL
    cells (4 image tokens, a coarse VCE mask), 128 px give 4×4. 0 keeps the original size."""
    # --- warm start (supervised, protocol-formatted targets)
    warm_start_steps: int = 60
    """Supervised steps before RL; 0 skips the warm start."""
    warm_start_batch_size: int = 16
    """Targets per supervised step."""
    warm_start_lr: float = 3e-3
    """AdamW learning rate of the warm start (a tiny model from scratch needs a large one)."""
    # --- RL (GRPO)
    rl_steps: int = 24
    """GRPO steps after the warm start."""
    prompts_per_step: int = 4
    """Distinct prompts per step (GRPO groups)."""
    n_rollouts: int = 4
    """Rollouts per prompt (the GRPO group size n)."""
    temperature: float = 1.0
    """Rollout sampling temperature."""
    top_k: int = 64
    """Rollouts sample from the top-k tokens (0 = full vocabulary, slower on CPU)."""
    max_new_tokens: int = 96
    """Response length limit."""
    lr: float = 1e-4
    """AdamW learning rate of the RL phase."""
    weight_decay: float = 0.01
    """AdamW weight decay (both phases)."""
    clip_ratio: float = 0.2
    """PPO clip ε (verl ``actor.clip_ratio``)."""
    kl_coef: float = 0.0
    """Coefficient of the low-variance KL loss to the frozen warm-started reference; 0 disables it."""
    kl_type: str = "low_var_kl"
    """verl ``core_algos.kl_penalty`` estimator name."""
    grad_clip: float = 1.0
    """Gradient-norm clip (both phases)."""
    loss_agg_mode: str = "token-mean"
    """verl ``agg_loss`` mode of the policy loss."""
    norm_adv_by_std: bool = True
    """GRPO (True) or Dr.GRPO (False) advantage normalisation."""
    # --- evaluation, logging, checkpoints
    eval_temperature: float = 0.0
    """Evaluation decoding temperature (0 = greedy)."""
    eval_batch_size: int = 24
    """Prompts per evaluation generate call."""
    checkpoint_every: int = 10
    """Save a checkpoint every N RL steps (and at the end); 0 saves only at the end."""
    evaluate: bool = True
    """Evaluate after the warm start and after RL, and write the report."""
    tensorboard: bool = True
    """Also log metrics to TensorBoard under ``<out>/tb``."""
    deterministic: bool = True
    """``torch.use_deterministic_algorithms`` (exact resume)."""
    num_threads: int = 0
    """torch intra-op threads; 0 keeps torch's default."""

    def validate(self) -> LocalConfig:
        """Raise ValueError naming the field when a value is out of range; return self."""
        positive = ("prompts_per_step", "n_rollouts", "max_new_tokens", "eval_batch_size", "train_size")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"local.{name} must be > 0, got {getattr(self, name)}")
        for name in ("rl_steps", "warm_start_steps", "checkpoint_every", "eval_size", "top_k", "kl_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"local.{name} must be >= 0, got {getattr(self, name)}")
        if self.n_rollouts < 2 and self.rl_steps > 0:
            raise ValueError("local.n_rollouts must be >= 2 for GRPO (advantages are relative to the group)")
        if self.temperature <= 0:
            raise ValueError(f"local.temperature must be > 0, got {self.temperature}")
        if self.model_family not in ("qwen3-vl", "qwen2.5-vl"):
            raise ValueError(
                f"local.model_family must be 'qwen3-vl' or 'qwen2.5-vl', got {self.model_family!r}"
            )
        return self


@dataclass
class TrainConfig:
    """A whole recipe: ``engine``, ``local`` and ``vlcal``."""

    engine: str = "local"
    local: LocalConfig = field(default_factory=LocalConfig)
    vlcal: VLCalConfig = field(default_factory=VLCalConfig)

    def to_dict(self) -> dict[str, Any]:
        return {"engine": self.engine, "local": dataclasses.asdict(self.local), "vlcal": self.vlcal.to_dict()}


def _set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = d
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {key!r}: {p!r} is not a block")
    node[parts[-1]] = value


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key=value`` overrides (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must be key=value")
        key, raw = item.split("=", 1)
        _set_dotted(d, key.strip(), yaml.safe_load(raw))
    return d


def _coerce(cls: type, values: dict[str, Any], where: str) -> dict[str, Any]:
    """Cast YAML scalars to the dataclass field types (YAML 1.1 reads ``1e-3`` as a string)."""
    hints = typing.get_type_hints(cls)
    out = dict(values)
    for key, value in values.items():
        hint = hints.get(key)
        if hint in (int, float) and isinstance(value, str):
            try:
                out[key] = hint(float(value)) if hint is int else float(value)
            except ValueError as err:
                raise ValueError(f"{where}.{key} must be a number, got {value!r}") from err
        elif hint is float and isinstance(value, int) and not isinstance(value, bool):
            out[key] = float(value)
    return out


def train_config_from_dict(d: dict[str, Any]) -> TrainConfig:
    """Build and validate a :class:`TrainConfig`, rejecting unknown keys (named in the error)."""
    d = dict(d or {})
    unknown = set(d) - {"engine", "local", "vlcal"}
    if unknown:
        raise ValueError(f"unknown top-level key(s) in train config: {sorted(unknown)}")
    engine = d.get("engine", "local")
    if engine != "local":
        raise ValueError(
            f"engine must be 'local' for `vlcal train` (got {engine!r}); use python -m vlcal_verl.main"
        )
    local_d = dict(d.get("local") or {})
    known = {f.name for f in dataclasses.fields(LocalConfig)}
    bad = set(local_d) - known
    if bad:
        raise ValueError(f"unknown key(s) in local: {sorted(bad)}")
    local = LocalConfig(**_coerce(LocalConfig, local_d, "local")).validate()
    vlcal_d = dict(d.get("vlcal") or {})
    for key, sub in (("reward", RewardConfig), ("vce", VCEConfig), ("tar", TARConfig)):
        if isinstance(vlcal_d.get(key), dict):
            vlcal_d[key] = _coerce(sub, vlcal_d[key], f"vlcal.{key}")
    return TrainConfig(engine=engine, local=local, vlcal=VLCalConfig.from_dict(vlcal_d))


def load_train_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a recipe YAML (or defaults when ``path`` is None) and apply ``key=value`` overrides."""
    d: dict[str, Any] = {}
    if path is not None:
        with open(path, encoding="utf-8") as f:
            d = yaml.safe_load(f) or {}
        if not isinstance(d, dict):
            raise ValueError(f"{path}: a recipe must be a mapping with engine/local/vlcal blocks")
    return train_config_from_dict(apply_overrides(d, list(overrides or [])))
