"""``python -m vlcal_verl.main``: VL-Calibration GRPO on verl 0.9.1 (the production entry point).

A thin layer over verl's own entry (the verl-recipe pattern): the Hydra config composes verl's
``ppo_trainer`` with the typed ``vlcal:`` block (``vlcal_verl/hydra_conf/vlcal_trainer.yaml``), the config is
checked exactly as ``verl.trainer.main_ppo.main`` checks it (``auto_set_device`` + ``validate_config``)
plus the vlcal checks, and verl's ``run_ppo`` starts Ray and the task runner. The only swap: the task
runner maps verl's ``sync`` trainer mode to ``VLCalTrainer`` (registered as ``"vlcal"`` by the plugin)
inside its own Ray actor — verl 0.9.1's ``TaskRunnerV1.run`` picks the trainer class from
``TRAINER_REGISTRY[trainer.v1.trainer_mode]`` and ``"sync"`` is also a mode verl checks by name.

``--check`` (anywhere on the command line) composes and validates the config, prints a summary and exits 0 — no Ray,
no GPU, no files written: CI and ``launch/submit.sh --check`` use it; ``--print-config`` (implies ``--check``)
makes stdout exactly the composed config as YAML, after the vlcal wiring (the rest goes to stderr), so two
runs can be diffed. ``--recipe recipes/<model>.yaml`` (or ``--recipe=FILE``) composes exactly that file
(see recipes/README.md); any other argument goes to Hydra (``--help``: :mod:`vlcal_verl.main_args`). A
configuration mistake is one line on stderr and exit code 2.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from vlcal_verl import main_args
from vlcal_verl.config import VLCalConfig
from vlcal_verl.main_args import (
    EXIT_CONFIG_ERROR,
    composition_error,
    hydra_argv,
    stdout_to_stderr,
    usage_error,
)

# the recipe API, imported from here by the tests, `vlcal eval --recipe` and the demo
CONFIG_DIR, compose_recipe, verl_config_dir = (
    main_args.CONFIG_DIR,
    main_args.compose_recipe,
    main_args.verl_config_dir,
)

SERVER_REWARD_KWARGS = ("w_brier", "w_fmt", "w_vis", "protocol", "reference_parity")

KNOWN_TOP_LEVEL_KEYS = frozenset(
    {
        # verl 0.9.1's ppo_trainer (tests/verl_ext/test_verl_recipes.py checks this list against it)
        "actor_rollout_ref", "algorithm", "critic", "custom_reward_function", "data", "distillation",
        "global_profiler", "model_engine", "ray_kwargs", "reward", "reward_model", "sandbox_fusion", "skip",
        "trainer", "transfer_queue",
        # this package's
        "vlcal", "demo", "science", "vlcal_model_family",
    }
)  # fmt: skip


class ConfigError(ValueError):
    """A user mistake in the composed config: reported as one line, exit code 2."""


"""The ``vlcal.reward`` fields the reward server's client sends per request."""

QWEN_PIXEL_KEYS = ("min_pixels", "max_pixels")
"""Qwen-VL's image budget; InternVL's processor tiles images instead (``min_patches``/``max_patches``)."""
INTERNVL_PROCESSOR_KEYS = ("min_patches", "max_patches", "crop_to_patches")


def vlcal_config(config: DictConfig) -> VLCalConfig:
    """Typed, validated ``vlcal:`` block (unknown keys and invalid combinations name the field)."""
    block = config.get("vlcal")
    if block is None:
        raise ValueError("config has no `vlcal:` block (compose vlcal_trainer)")
    return VLCalConfig.from_dict(OmegaConf.to_container(block, resolve=True))


def wire_reward(config: DictConfig, vcfg: VLCalConfig) -> None:
    """In-process ``vlcal_verl.rewards.compute_score`` by default; the reward server's client when
    ``vlcal.reward_server_url`` is set. Weights/protocol always come from ``vlcal.reward``."""
    crf = config.reward.custom_reward_function
    kwargs = dict(OmegaConf.to_container(config.vlcal.reward, resolve=True))
    with open_dict(config):
        if vcfg.reward_server_url:
            # the client sends the weights, protocol and parity mode with every request (variant=authors
            # scores with the authors' rules on the server too); the grading timeout is the server's own
            # the client's retry budget etc. set under reward_kwargs (max_retries=..., timeout_s=...) are kept
            from reward_server.client import TRANSPORT_OPTIONS

            given = crf.get("reward_kwargs") or {}
            crf.path, crf.name = "pkg://reward_server.client", "compute_score"
            kwargs = {k: kwargs[k] for k in SERVER_REWARD_KWARGS} | {"server_url": vcfg.reward_server_url}
            kwargs |= {k: given[k] for k in TRANSPORT_OPTIONS if given.get(k) is not None}
        crf.reward_kwargs = kwargs


def wire_perception(config: DictConfig, vcfg: VLCalConfig) -> None:
    """With the perception filter, the actor's policy loss is ``vlcal_perception`` (verl's vanilla PPO
    loss on the kept tokens; :mod:`vlcal_verl.verl_ext.perception`)."""
    from vlcal_verl.verl_ext.perception import LOSS_MODE

    policy_loss = config.actor_rollout_ref.actor.policy_loss
    mode = policy_loss.get("loss_mode", "vanilla")
    if vcfg.perception.enabled:
        if mode not in ("vanilla", LOSS_MODE):
            raise ConfigError(
                f"vlcal.perception.enabled uses actor.policy_loss.loss_mode={LOSS_MODE!r} (vanilla PPO on the "
                f"kept tokens); got loss_mode={mode!r}: set vlcal.perception.enabled=false to use it"
            )
        with open_dict(config):
            policy_loss.loss_mode = LOSS_MODE
    elif mode == LOSS_MODE:
        raise ConfigError(
            f"actor.policy_loss.loss_mode={LOSS_MODE!r} needs vlcal.perception.enabled=true (it reads the mask)"
        )


def name_run(config: DictConfig, vcfg: VLCalConfig) -> None:
    """Append a non-default variant / ablation to ``trainer.experiment_name``, so each paper row gets
    its own checkpoint folder (``default_local_dir`` interpolates the name) and never resumes another's."""
    name = str(config.trainer.experiment_name)
    for part, default in ((vcfg.variant, "authors"), (vcfg.ablation, "full")):
        suffix = f"-{part}"
        if part != default and not name.endswith(suffix) and f"{suffix}-" not in name:
            name += suffix
    with open_dict(config):
        config.trainer.experiment_name = name


def check_config_values(config: DictConfig) -> None:
    """What verl's own checks let through: top-level typos, non-integer cluster sizes, GRPO with n < 2."""
    unknown = sorted(set(config.keys()) - KNOWN_TOP_LEVEL_KEYS)
    if unknown:
        raise ConfigError(
            f"unknown top-level key(s) {unknown}: not a section of verl's ppo_trainer or vlcal "
            f"(known: {sorted(KNOWN_TOP_LEVEL_KEYS)})"
        )
    for key in ("nnodes", "n_gpus_per_node"):
        value = config.trainer.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"trainer.{key} must be a positive integer, got {value!r}")
    n = config.actor_rollout_ref.rollout.get("n")
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ConfigError(
            f"actor_rollout_ref.rollout.n must be an integer >= 2 (GRPO compares rollouts of one prompt), "
            f"got {n!r}"
        )
    for key in ("train_batch_size", "max_prompt_length", "max_response_length"):
        value = config.data.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"data.{key} must be a positive integer, got {value!r}")


def missing_paths(config: DictConfig) -> list[str]:
    """Model and data paths that do not exist on this machine (warnings: a login node may not mount the
    cluster's storage)."""
    out = []
    model = config.actor_rollout_ref.model.get("path")
    if model and str(model) != "???" and "://" not in str(model) and not Path(str(model)).exists():
        out.append(f"actor_rollout_ref.model.path does not exist here: {model}")
    for key in ("train_files", "val_files"):
        files = config.data.get(key)
        for f in [files] if isinstance(files, str) else list(files or []):
            if "://" not in str(f) and not Path(str(f)).exists():
                out.append(f"data.{key} does not exist here: {f}")
    return out


def is_internvl(config: DictConfig) -> bool:
    """An InternVL run: ``vlcal_model_family`` / ``demo.model_family`` internvl or a model path naming it."""
    demo = config.get("demo") or {}
    family = str(config.get("vlcal_model_family") or demo.get("model_family") or "").lower()
    path = str(config.actor_rollout_ref.model.get("path") or "").lower()
    return family == "internvl" or "internvl" in path


def check_model_supported(config: DictConfig) -> None:
    """InternVL's settings, before any GPU work: the processor kwargs verl sends both to the agent loop's
    processor and, per request, to vLLM (so both tile an image alike) must be InternVL's; no Ulysses
    (verl 0.9.1 has no sequence-parallel patch for InternVL)."""
    if not is_internvl(config):
        return
    kwargs = dict(config.data.get("mm_processor_kwargs") or {})
    qwen = [k for k in QWEN_PIXEL_KEYS if k in kwargs]
    if qwen:
        raise ConfigError(
            f"data.mm_processor_kwargs has Qwen-VL's {qwen}; InternVL tiles images instead — set "
            f"data.mm_processor_kwargs=null (the checkpoint's processor settings) or use {list(INTERNVL_PROCESSOR_KEYS)}"
        )
    unknown = sorted(set(kwargs) - set(INTERNVL_PROCESSOR_KEYS))
    if unknown:
        raise ConfigError(
            f"data.mm_processor_kwargs: {unknown} are not InternVL processor settings ({list(INTERNVL_PROCESSOR_KEYS)})"
        )
    engine = config.actor_rollout_ref.rollout.get("engine_kwargs", {}) or {}
    vllm_kwargs = dict((engine.get("vllm", {}) or {}).get("mm_processor_kwargs", {}) or {})
    clash = {k: (v, kwargs.get(k)) for k, v in vllm_kwargs.items() if k in kwargs and kwargs[k] != v}
    if clash:
        raise ConfigError(
            "vLLM's engine mm_processor_kwargs and data.mm_processor_kwargs tile images differently "
            f"({clash}): verl's prompt ids would not match vLLM's expansion of the image placeholders"
        )
    for role in ("actor", "ref"):
        sp = int(config.actor_rollout_ref[role].get("ulysses_sequence_parallel_size", 1) or 1)
        if sp != 1:
            raise ConfigError(
                f"actor_rollout_ref.{role}.ulysses_sequence_parallel_size={sp}: verl 0.9.1 has no Ulysses "
                "patch for InternVL; use 1"
            )


def check_vlcal_vs_verl(config: DictConfig, vcfg: VLCalConfig) -> None:
    """vlcal needs verl's V1 sync trainer and, with VCE, a logits-reading, non-SP actor."""
    if not config.trainer.use_v1 or config.trainer.v1.trainer_mode != "sync":
        raise ValueError(
            "vlcal needs trainer.use_v1=true and trainer.v1.trainer_mode=sync "
            f"(got use_v1={config.trainer.use_v1}, trainer_mode={config.trainer.v1.trainer_mode})"
        )
    if config.algorithm.adv_estimator != "grpo":
        raise ValueError(
            f"vlcal is GRPO: algorithm.adv_estimator must be 'grpo', got {config.algorithm.adv_estimator!r}"
        )
    if vcfg.vce.enabled:
        actor = config.actor_rollout_ref.actor
        if int(actor.get("ulysses_sequence_parallel_size", 1)) != 1:
            raise ValueError("vlcal.vce needs actor_rollout_ref.actor.ulysses_sequence_parallel_size=1")
        if bool(config.actor_rollout_ref.model.get("use_fused_kernels", False)):
            raise ValueError(
                "vlcal.vce needs actor_rollout_ref.model.use_fused_kernels=false (it reads logits)"
            )
        if actor.strategy not in ("fsdp", "fsdp2"):
            raise ValueError(f"vlcal.vce runs through verl's FSDP engine; actor.strategy={actor.strategy!r}")
    rc = config.algorithm.get("rollout_correction", None)
    if rc is not None and rc.get("bypass_mode", False):  # verl then skips the pass that computes entropy
        sections = (("vce", vcfg.vce), ("tar", vcfg.tar))
        needs = [f"vlcal.{n}.entropy" for n, sec in sections if sec.enabled and sec.entropy == "distribution"]
        if needs:
            raise ValueError(
                "algorithm.rollout_correction.bypass_mode=true skips verl's old-log-prob pass, which computes "
                f"the per-token entropy that {' and '.join(k + '=distribution' for k in needs)} read: set "
                f"{' '.join(k + '=nll' for k in needs)}, or bypass_mode=false"
            )


def use_cpu_backend(config: DictConfig) -> None:
    """``trainer.device=cpu``: verl's loop on this machine (platform, engine, rollout, private Ray head)."""
    from vlcal_verl.verl_ext.cpu_backend.ray_local import configure_ray_init, set_cpu_env

    set_cpu_env()  # before anything imports ray: Ray reads its loopback switch at import time
    from vlcal_verl.verl_ext.cpu_backend import register_cpu_backend

    register_cpu_backend()
    try:
        configure_ray_init(config)
    except ValueError as err:  # e.g. trainer.nnodes > 1 without a cluster to join
        raise ConfigError(str(err)) from None


def prepare(config: DictConfig) -> VLCalConfig:
    """Everything verl's ``main`` checks before Ray starts, plus the vlcal checks. Mutates ``config``."""
    try:
        vcfg = vlcal_config(config)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    check_config_values(config)
    from vlcal_verl.verl_ext.layout_check import layout_problem  # verl's mid-run batch/parallel asserts

    if (problem := layout_problem(config)) is not None:
        raise ConfigError(problem)
    if str(config.trainer.get("device", "cuda")) == "cpu":
        use_cpu_backend(config)  # before the first `import verl`: it decides the platform and Ray's address
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config
    from verl.utils.device import auto_set_device

    check_model_supported(config)
    try:
        check_vlcal_vs_verl(config, vcfg)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    wire_reward(config, vcfg)
    wire_perception(config, vcfg)
    name_run(config, vcfg)
    auto_set_device(config)
    validate_config(
        config=config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config)
    )
    check_worker_configs(config)
    return vcfg


def check_worker_configs(config: DictConfig) -> None:
    """Build the rollout/ref dataclasses the workers build in ``init_model`` (their ``__post_init__``
    checks, e.g. vLLM expert_parallel_size = TP × DP), so a bad recipe fails here, not on the GPUs."""
    from verl.utils.config import omega_conf_to_dataclass

    resolved = OmegaConf.create(OmegaConf.to_container(config, resolve=True))  # as the task runner does
    omega_conf_to_dataclass(resolved.actor_rollout_ref.rollout)


@contextlib.contextmanager
def sync_mode_runs(trainer_cls: type) -> Iterator[None]:
    """Inside this process, ``get_trainer_cls("sync")`` returns ``trainer_cls`` (restored on exit)."""
    from verl.trainer.ppo.v1 import trainer_base

    previous = trainer_base.TRAINER_REGISTRY["sync"]
    trainer_base.TRAINER_REGISTRY["sync"] = trainer_cls
    try:
        yield
    finally:
        trainer_base.TRAINER_REGISTRY["sync"] = previous


def _task_runner() -> Any:
    import ray
    from verl.trainer.main_ppo import TaskRunnerV1

    class VLCalTaskRunner(TaskRunnerV1.__ray_actor_class__):
        """verl's V1 task runner; its ``sync`` trainer is ``VLCalTrainer`` in this actor process."""

        def run(self, config: DictConfig):
            from verl.trainer.ppo.v1 import get_trainer_cls

            from vlcal_verl.verl_ext.plugin import register

            with sync_mode_runs(get_trainer_cls(register())):
                return super().run(config)

    return ray.remote(VLCalTaskRunner)


def summary(config: DictConfig, vcfg: VLCalConfig) -> str:
    t, r, d = config.trainer, config.actor_rollout_ref.rollout, config.data
    method = (
        "rlcr"
        if vcfg.reward.protocol == "rlcr"
        else (
            "decoupled"
            if not vcfg.vce.enabled
            else f"vce_{vcfg.vce.signal}"
            + ("+tar" if vcfg.tar.enabled else "")
            + ("+perception" if vcfg.perception.enabled else "")
        )
    )
    return (
        f"[vlcal] config OK: model={config.actor_rollout_ref.model.path} variant={vcfg.variant} "
        f"ablation={vcfg.ablation} ({method}) experiment={t.experiment_name} "
        f"nodes={t.nnodes}x{t.n_gpus_per_node}GPU batch={d.train_batch_size}x{r.n} "
        f"reward={config.reward.custom_reward_function.path} ckpt={t.default_local_dir}"
    )


@hydra.main(config_path="hydra_conf", config_name="vlcal_trainer", version_base=None)
def _hydra_main(config: DictConfig) -> None:
    print_config = os.environ.get("VLCAL_PRINT_CONFIG") == "1"
    with stdout_to_stderr(print_config):  # --print-config: stdout is the YAML and nothing else
        try:
            vcfg = prepare(config)
        except ConfigError as err:
            print(f"[vlcal] config error: {err}", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_CONFIG_ERROR) from None
        print(summary(config, vcfg), flush=True)
        for warning in missing_paths(config):
            print(f"[vlcal] warning: {warning}", file=sys.stderr, flush=True)
        if os.environ.get("VLCAL_CHECK_ONLY") == "1":
            import vlcal_verl

            print(f"[vlcal] package: {Path(vlcal_verl.__file__).parent}", flush=True)
    if print_config:
        print(OmegaConf.to_yaml(config, resolve=True), end="", flush=True)
    if os.environ.get("VLCAL_CHECK_ONLY") == "1":
        return
    from verl.trainer.main_ppo import run_ppo

    from vlcal_verl.verl_ext import node_watchdog

    node_watchdog.start(float(config.vlcal.node_watchdog_s))
    run_ppo(config, task_runner_class=_task_runner())


def main(argv: list[str] | None = None) -> None:
    """``python -m vlcal_verl.main [--check] [--print-config] [--recipe FILE.yaml] [hydra args]`` (``--help``)."""
    args = hydra_argv(sys.argv[1:] if argv is None else argv)
    problem = composition_error(args)
    if problem is not None:
        usage_error(f"config error: {problem}")
    sys.argv = [sys.argv[0], *args]
    _hydra_main()


if __name__ == "__main__":
    main()
