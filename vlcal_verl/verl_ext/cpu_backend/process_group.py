"""The gloo process group of a verl worker-group rank on the CPU platform.

verl 0.9.1 opens each worker's global group in ``initialize_global_process_group_ray`` with the backend
string ``cpu:gloo,{device}:{backend}``. On the CPU platform that is ``cpu:gloo,cpu:gloo``, and torch
rejects the duplicate device ("Duplicate device type cpu"). verl opens a group only when none is open
(``torch.distributed.is_initialized()``), so a rank that has already opened plain ``gloo`` — the same
rank, world size and init method verl would use — goes through verl's call unchanged.

Two ways in, both idempotent:

- :func:`ray_worker_process_setup`, Ray's ``worker_process_setup_hook`` (``ray_init.runtime_env`` of a
  verl config): runs in every Ray worker process before any actor code, and opens the group in the
  processes of verl's worker groups (``WG_BACKEND=ray`` plus the rank variables verl's
  ``RayWorkerGroup`` sets). This is what lets verl's **stock** worker classes run on the CPU platform
  (``examples/verl_reward_server/grpo_cpu.yaml``).
- :func:`vlcal_verl.verl_ext.worker.open_cpu_process_group`, called by this project's worker class.

Only with ``VERL_PLATFORM=cpu``: on a GPU platform both are no-ops and verl opens its own group.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from vlcal_verl.verl_ext.cpu_backend import cpu_backend_requested

RANK_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
HOOK = "vlcal_verl.verl_ext.cpu_backend.process_group.ray_worker_process_setup"


def is_worker_group_rank(env: Mapping[str, str] = os.environ) -> bool:
    """A process of a verl ``RayWorkerGroup`` on the CPU platform (the TaskRunner, agent-loop workers,
    rollout servers and reward workers are not: verl sets ``WG_BACKEND`` and the rank variables only
    for worker-group ranks)."""
    return cpu_backend_requested(env) and env.get("WG_BACKEND") == "ray" and all(env.get(k) for k in RANK_ENV)


def ray_worker_process_setup() -> None:
    """Ray ``worker_process_setup_hook``: in verl worker-group ranks on the CPU platform, verl's own
    ``initialize_global_process_group_ray`` with plain ``gloo`` (verl's rank, world size and init method;
    a no-op when a group is open); nothing anywhere else (it only reads the environment there)."""
    if is_worker_group_rank():
        from verl.utils.distributed import initialize_global_process_group_ray

        initialize_global_process_group_ray(timeout_second=None, backend="gloo")
