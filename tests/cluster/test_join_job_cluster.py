"""The CPU backend's Ray settings inside and outside a Ray job (no Ray started: the composed ``ray_init``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vlcal_verl.commands.train import DEFAULT_RECIPE
from vlcal_verl.main import compose_recipe
from vlcal_verl.verl_ext.cpu_backend import ray_local

ROOT = Path(__file__).resolve().parents[2]
JOB_ENV = {"env_vars": {"TOKENIZERS_PARALLELISM": "true", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}}


def test_a_job_driver_joins_the_job_cluster(monkeypatch):
    """In a Ray job: ``address: auto``, none of the head-only settings Ray refuses when joining, and the
    CPU env vars except the job's own keys (Ray refuses a repeated key) and the loopback switch."""
    monkeypatch.setenv(ray_local.JOB_ENV, json.dumps({"runtime_env": JOB_ENV}))
    cfg = compose_recipe(DEFAULT_RECIPE, ["trainer.nnodes=2", "trainer.n_gpus_per_node=1"])
    out = ray_local.configure_ray_init(cfg)
    assert out["address"] == "auto"
    assert not {"num_gpus", "num_cpus", "_node_ip_address", "include_dashboard", "_temp_dir"} & set(out)
    env = out["runtime_env"]["env_vars"]
    assert env == {"VERL_PLATFORM": "cpu", "OMP_NUM_THREADS": "1"}


def test_without_a_job_the_head_is_private_and_local(monkeypatch):
    monkeypatch.delenv(ray_local.JOB_ENV, raising=False)
    out = ray_local.configure_ray_init(compose_recipe(DEFAULT_RECIPE, []))
    assert out["address"] == "local" and out["_node_ip_address"] == "127.0.0.1" and out["num_gpus"] == 2
    assert out["runtime_env"]["env_vars"]["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"


def test_several_nodes_without_a_cluster_is_one_line_exit_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "vlcal_verl.main", "--check", "--recipe", str(DEFAULT_RECIPE),
         f"demo.dir={tmp_path}", "trainer.nnodes=2", "trainer.n_gpus_per_node=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "config error" in line]
    assert len(errors) == 1 and "trainer.nnodes must be 1" in errors[0] and "launch/submit.sh" in errors[0]
    assert "Traceback" not in proc.stderr


@pytest.fixture(autouse=True)
def _keep_environ(monkeypatch):
    """configure_ray_init pops RAY_ADDRESS / RAY_AUTH_MODE outside a job: undone after each test."""
    import os

    for key in ("RAY_ADDRESS", "RAY_AUTH_MODE"):
        if key in os.environ:
            monkeypatch.setenv(key, os.environ[key])
