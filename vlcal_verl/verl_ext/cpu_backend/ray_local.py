"""The private Ray head for verl on a CPU: 127.0.0.1 only, logical GPUs = FSDP ranks.

verl's ``run_ppo`` calls ``ray.init(**ray_kwargs.ray_init)`` when no Ray is running; this module only fills
that block (:func:`configure_ray_init`), so Ray is still started, and stopped, by verl's own entry:

- ``address: local`` — always a fresh head owned by this process (never a cluster named by
  ``RAY_ADDRESS``), stopped with it;
- ``_node_ip_address: 127.0.0.1`` — nothing listens on an external interface;
- ``num_gpus`` — verl's resource pools count GPU resources only, so the head advertises one *logical*
  GPU per FSDP rank (``trainer.n_gpus_per_node``); workers never touch a GPU (platform ``cpu``);
- ``num_cpus`` — enough *logical* CPUs for verl's placement bundles (``max_colocate_count`` CPUs per
  rank), the task runner, TransferQueue, agent-loop and reward workers (Ray does not pin cores);
- ``runtime_env.env_vars.VERL_PLATFORM=cpu`` — every worker resolves the CPU platform on ``import verl``.

Submitted as a Ray job (``launch/submit.sh``; Ray's job supervisor sets ``RAY_JOB_CONFIG_JSON_ENV_VAR`` in
the driver) the run joins that job's cluster instead (:func:`join_job_cluster`): the cluster's nodes declare
the logical GPUs and CPUs (``ray start --num-gpus``), so ``trainer.nnodes`` may be more than 1.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

LOCAL_IP = "127.0.0.1"
CPU_ENV_VARS = {
    "VERL_PLATFORM": "cpu",
    # 2-core machines: one intra-op thread per worker process keeps the FSDP ranks from fighting
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    # Ray's single-machine mode: every address it advertises is the loopback one. Read by Ray at import
    # time (``ray._private.ray_constants``), so it is set before ``import ray`` (:func:`set_cpu_env`)
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}


JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for a submitted job's driver
LOOPBACK_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def in_ray_job() -> bool:
    """This process is the driver of a ``ray job submit`` job: the cluster is already there."""
    return JOB_ENV in os.environ


def set_cpu_env() -> None:
    """Export :data:`CPU_ENV_VARS` in this process (the driver); fail if Ray was imported too early.
    In a Ray job the cluster's own address rules stay (its nodes may be other hosts)."""
    if in_ray_job():
        for key, value in CPU_ENV_VARS.items():
            if key != LOOPBACK_ONLY:
                os.environ.setdefault(key, value)
        return
    for key, value in CPU_ENV_VARS.items():
        os.environ.setdefault(key, value)
    if "ray" in sys.modules:
        from ray._private import ray_constants

        if ray_constants.ENABLE_RAY_CLUSTER:
            raise RuntimeError(
                "trainer.device=cpu: Ray was imported before the CPU backend could make it bind to "
                "127.0.0.1; export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before starting Python"
            )


def logical_cpus(config: DictConfig) -> int:
    """Logical CPUs the head advertises: every placement bundle plus the driver-side actors."""
    ranks = int(config.trainer.n_gpus_per_node) * int(config.trainer.nnodes)
    return 4 * ranks + 16


def configure_ray_init(config: DictConfig) -> dict[str, Any]:
    """Fill ``config.ray_kwargs.ray_init`` for a private local CPU head (or, in a Ray job, for joining
    the job's cluster: :func:`join_job_cluster`); return the block as a dict."""
    if in_ray_job():
        return join_job_cluster(config)
    if int(config.trainer.nnodes) != 1:
        raise ValueError(
            f"trainer.device=cpu without a cluster runs on one machine: trainer.nnodes must be 1, got "
            f"{config.trainer.nnodes} (for several nodes start a Ray cluster with launch/ray_head.sh and "
            "launch/ray_worker.sh and submit with launch/submit.sh)"
        )
    ranks = int(config.trainer.n_gpus_per_node)
    with open_dict(config):
        ray_init = config.ray_kwargs.ray_init
        ray_init.address = "local"
        ray_init._node_ip_address = LOCAL_IP
        ray_init.include_dashboard = False
        ray_init.num_gpus = ranks
        if ray_init.get("num_cpus") is None:
            ray_init.num_cpus = logical_cpus(config)
        env_vars = ray_init.runtime_env.get("env_vars") or {}
        ray_init.runtime_env.env_vars = {**CPU_ENV_VARS, **OmegaConf.to_container(OmegaConf.create(env_vars))}
    # the CPU env vars themselves are exported by the caller before Ray is imported (set_cpu_env)
    # a cluster named in the environment (RAY_ADDRESS, token auth) is not ours to join: the private head
    # runs without auth and is reachable from 127.0.0.1 only
    for key in ("RAY_ADDRESS", "RAY_AUTH_MODE"):
        os.environ.pop(key, None)
    return OmegaConf.to_container(config.ray_kwargs.ray_init, resolve=True)


def join_job_cluster(config: DictConfig) -> dict[str, Any]:
    """``ray_init`` for the driver of a Ray job: ``address: auto`` (the job's cluster, whose nodes declare
    the logical GPUs verl places ranks on), no head-only settings, and the CPU env vars for every worker
    except those the job's own runtime env already sets (Ray refuses a driver runtime env whose
    ``env_vars`` repeat a key of the job's) and the loopback switch (the nodes may be other hosts)."""
    job_env = (json.loads(os.environ[JOB_ENV] or "{}").get("runtime_env") or {}).get("env_vars") or {}
    with open_dict(config):
        ray_init = config.ray_kwargs.ray_init
        ray_init.address = "auto"
        for key in ("_node_ip_address", "include_dashboard", "num_gpus", "num_cpus", "_temp_dir"):
            ray_init.pop(key, None)
        env_vars = ray_init.runtime_env.get("env_vars") or {}
        wanted = {**CPU_ENV_VARS, **OmegaConf.to_container(OmegaConf.create(env_vars))}
        ray_init.runtime_env.env_vars = {
            k: v for k, v in wanted.items() if k not in job_env and k != LOOPBACK_ONLY
        }
    return OmegaConf.to_container(config.ray_kwargs.ray_init, resolve=True)
