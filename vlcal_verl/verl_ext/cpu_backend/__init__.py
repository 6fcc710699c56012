"""verl on a CPU: the platform, engine and rollout that let verl's own loop run on one CPU machine.

Selected with ``VERL_PLATFORM=cpu`` (``trainer.device=cpu`` in the config; the launcher sets the
variable for the driver and, through the Ray runtime env, for every worker). Everything registers
through verl 0.9.1's own extension points — nothing of verl is edited or copied:

====================  ===========================================  =====================================
piece                 verl registry / hook                         module
====================  ===========================================  =====================================
platform ``cpu``      ``verl.plugin.platform.PlatformRegistry``    :mod:`.platform`
FSDP engine on cpu    ``verl.workers.engine.EngineRegistry``       :mod:`.engine`
HF rollout replica    ``RolloutReplicaRegistry``                   :mod:`.rollout`
gloo process group    opened before verl's (``is_initialized``)    :mod:`.process_group`, worker.py
local Ray head        logical GPUs = FSDP ranks, 127.0.0.1         :mod:`.ray_local`
====================  ===========================================  =====================================

:func:`register_cpu_backend` runs on ``import verl`` in every process through the ``verl.plugins`` entry
point (:mod:`vlcal_verl.verl_ext.plugin`) when ``VERL_PLATFORM=cpu``; GPU runs never import this package.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

PLATFORM_ENV = "VERL_PLATFORM"


def cpu_backend_requested(env: Mapping[str, str] = os.environ) -> bool:
    """``VERL_PLATFORM=cpu`` in this process's environment (or in ``env``)."""
    return env.get(PLATFORM_ENV, "").strip().lower() == "cpu"


def register_platform_only() -> None:
    """The platform alone: must precede anything that calls ``verl.plugin.platform.get_platform()``."""
    from vlcal_verl.verl_ext.cpu_backend.platform import register_platform

    register_platform()


def register_cpu_backend() -> None:
    """Platform, engines and rollout (idempotent). Call with ``VERL_PLATFORM=cpu`` set."""
    register_platform_only()
    from vlcal_verl.verl_ext.cpu_backend.engine import register_engines

    register_engines()
    try:
        from vlcal_verl.verl_ext.cpu_backend.rollout import register_rollout
    except ImportError:  # pragma: no cover - the rollout module is optional while it is being built
        return
    register_rollout()
