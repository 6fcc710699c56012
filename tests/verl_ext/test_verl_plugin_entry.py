"""Registration: verl's own plugin loader (fresh processes) and the task runner's trainer swap."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = (
    "import sys, verl\n"
    "from verl.trainer.ppo.v1 import get_trainer_cls\n"
    "print('loaded', 'vlcal_verl.verl_ext.plugin' in sys.modules)\n"
    "try:\n"
    "    c = get_trainer_cls('vlcal'); print('vlcal', c.__module__ + '.' + c.__name__)\n"
    "except ValueError:\n"
    "    print('vlcal', None)\n"
    "print('sync', get_trainer_cls('sync').__name__)\n"
)


def _probe(policy: str | None) -> str:
    env = dict(os.environ)
    env.pop("VERL_USE_EXTERNAL_PLUGINS", None)
    if policy is not None:
        env["VERL_USE_EXTERNAL_PLUGINS"] = policy
    return subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=240, check=True
    ).stdout


def test_plugin_registers_on_import_verl_in_fresh_process():
    out = _probe(None)
    assert "loaded True" in out
    assert "vlcal vlcal_verl.verl_ext.trainer.VLCalTrainer" in out
    assert "sync PPOTrainerSync" in out  # verl's own sync trainer is left alone


def test_plugin_policy_none_disables_it():
    out = _probe("none")
    assert "loaded False" in out and "vlcal None" in out


def test_register_is_idempotent():
    from verl.trainer.ppo.v1 import get_trainer_cls

    from vlcal_verl.verl_ext.plugin import register
    from vlcal_verl.verl_ext.trainer import VLCalTrainer

    assert register() == register() == "vlcal"
    assert get_trainer_cls("vlcal") is VLCalTrainer


def test_task_runner_maps_sync_to_vlcal_only_inside():
    from verl.trainer.main_ppo import TaskRunnerV1
    from verl.trainer.ppo.v1 import PPOTrainerSync, get_trainer_cls

    from vlcal_verl.main import _task_runner, sync_mode_runs
    from vlcal_verl.verl_ext.trainer import VLCalTrainer

    with sync_mode_runs(VLCalTrainer):
        assert get_trainer_cls("sync") is VLCalTrainer
    assert get_trainer_cls("sync") is PPOTrainerSync
    with pytest.raises(RuntimeError), sync_mode_runs(VLCalTrainer):
        raise RuntimeError("restored even on error")
    assert get_trainer_cls("sync") is PPOTrainerSync
    runner = _task_runner().__ray_actor_class__
    assert issubclass(runner, TaskRunnerV1.__ray_actor_class__) and "run" in vars(runner)
