"""verl plugin hook: makes VL-Calibration's trainer known to verl by name in every process.

verl 0.9.1 (``verl/__init__.py``) loads every ``verl.plugins`` entry point on ``import verl``
(``VERL_USE_EXTERNAL_PLUGINS``: ``auto`` default, ``none``, or a comma list). It *imports* the entry
point's target and never calls it, and swallows import errors at debug level — so this module
registers on import, and :func:`register` is idempotent (our task runner calls it again and fails
loudly if something is wrong).

What is registered: with ``VERL_PLATFORM=cpu``, first the CPU backend
(:mod:`vlcal_verl.verl_ext.cpu_backend`: platform, FSDP engine on cpu, HF rollout); always ``VLCalTrainer`` as verl V1 trainer ``"vlcal"`` (``get_trainer_cls("vlcal")``) and the
perception filter's policy loss ``"vlcal_perception"`` (``core_algos.register_policy_loss``). It does
*not* replace verl's ``"sync"`` trainer, so a plain ``python -m verl.trainer.main_ppo`` in the same
environment is unaffected. Ray workers need nothing else: the worker class travels by reference
(``vlcal_verl.verl_ext.worker``) and is importable wherever the runtime env ships this package.
Cost: importing verl's V1 trainer package on ``import verl`` (about a second on a GPU node).
"""

from __future__ import annotations

TRAINER_NAME = "vlcal"


def _register_cpu_backend_if_requested() -> None:
    """``VERL_PLATFORM=cpu``: the CPU platform, engine and rollout (before anything asks for a platform)."""
    from vlcal_verl.verl_ext.cpu_backend import cpu_backend_requested, register_cpu_backend

    if cpu_backend_requested():
        register_cpu_backend()


def register() -> str:
    """Register ``VLCalTrainer`` as verl trainer ``"vlcal"`` (idempotent); return the name."""
    _register_cpu_backend_if_requested()
    from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY, register_trainer

    from vlcal_verl.verl_ext.perception import register_perception_loss
    from vlcal_verl.verl_ext.trainer import VLCalTrainer

    register_perception_loss()
    if TRAINER_REGISTRY.get(TRAINER_NAME) is not VLCalTrainer:
        register_trainer(TRAINER_NAME)(VLCalTrainer)
    return TRAINER_NAME


register()
