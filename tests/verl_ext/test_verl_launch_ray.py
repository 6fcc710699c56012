"""launch/: the dry run prints the exact command; a real `ray job submit` against a local head finishes.

The integration test starts a CPU-only Ray head on 127.0.0.1 with token authentication (a fresh random
token in RAY_AUTH_TOKEN, RAY_AUTH_MODE=token for head and CLI alike — nothing is written to ~/.ray),
submits `python -m vlcal_verl.main --check` through launch/submit.sh (the package travels as the job's
working_dir), waits for SUCCEEDED with a bounded loop, and stops only the processes it started (its own
process group, plus any process whose command line names its private temp dir).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
SUBMIT = ROOT / "launch" / "submit.sh"


def _env(**extra):
    env = dict(os.environ, VLCAL_PYTHON=sys.executable, VLCAL_RAY=str(VENV_BIN / "ray"))
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def test_dry_run_prints_exact_command():
    out = subprocess.run(
        [
            str(SUBMIT),
            "--recipe",
            "recipes/qwen3_vl_8b.yaml",
            "--address",
            "http://head:8265",
            "--nodes",
            "4",
            "--gpus-per-node",
            "8",
            "--dry-run",
            "--",
            "ablation=vce_kl",
            "trainer.experiment_name=a b",
        ],
        cwd=ROOT,
        env=_env(VLCAL_DATA_DIR="/mnt/d"),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    argv = shlex.split(out)
    assert argv[:5] == [str(VENV_BIN / "ray"), "job", "submit", "--address", "http://head:8265"]
    i = argv.index("--")
    assert argv[i + 1 :] == [
        "python",
        "-m",
        "vlcal_verl.main",
        "--recipe",
        "recipes/qwen3_vl_8b.yaml",
        "trainer.nnodes=4",
        "trainer.n_gpus_per_node=8",
        "ablation=vce_kl",
        "trainer.experiment_name=a b",
    ]
    import json

    runtime = json.loads(argv[argv.index("--runtime-env-json") + 1])
    assert runtime["working_dir"] == str(ROOT) and "/.venv/" in runtime["excludes"]
    assert runtime["env_vars"]["VLCAL_DATA_DIR"] == "/mnt/d"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "--recipe is required"),
        (["--recipe", "nope.yaml"], "no such file"),
        (["--recipe", "recipes/qwen3_vl_4b.yaml", "--nodes", "0"], "positive integers"),
        (["--recipe", "recipes/qwen3_vl_4b.yaml", "ablation=rlcr"], "after --"),
    ],
)
def test_submit_rejects_bad_arguments(args, message):
    r = subprocess.run(
        [str(SUBMIT), *args, "--dry-run"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2 and message in r.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids_naming(text: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if text in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def _stop(head: subprocess.Popen, temp_dir: str) -> None:
    for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 5)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, sig)  # the process group we created (start_new_session)
        for pid in _pids_naming(temp_dir):  # daemons that left our group still name our temp dir
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.time() + wait_s
        while time.time() < deadline and (head.poll() is None or _pids_naming(temp_dir)):
            time.sleep(0.5)
        if head.poll() is not None and not _pids_naming(temp_dir):
            return


@pytest.mark.integration
def test_ray_job_submit_runs_config_check_on_local_head():
    port, dash = _free_port(), _free_port()
    temp_dir = tempfile.mkdtemp(prefix="rayh6_", dir="/tmp")
    env = _env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=uuid.uuid4().hex, RAY_USAGE_STATS_ENABLED="0")
    head = subprocess.Popen(
        [
            str(VENV_BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--port",
            str(port),
            "--num-cpus",
            "1",
            "--num-gpus",
            "0",
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(dash),
            "--temp-dir",
            temp_dir,
            "--object-store-memory",
            str(100 * 1024**2),
            "--disable-usage-stats",
        ],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    address = f"http://127.0.0.1:{dash}"
    sid = f"vlcal-check-{uuid.uuid4().hex[:8]}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                req = urllib.request.Request(
                    f"{address}/api/version", headers={"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"}
                )
                urllib.request.urlopen(req, timeout=5)  # 401 without the token: auth is on
                break
            except OSError:
                assert head.poll() is None, "ray head exited during start"
                assert time.time() < deadline, "ray dashboard did not come up in 90 s"
                time.sleep(1)
        subprocess.run(
            [
                str(SUBMIT),
                "--recipe",
                "recipes/qwen3_vl_4b.yaml",
                "--address",
                address,
                "--check",
                "--no-wait",
                "--submission-id",
                sid,
                "--",
                "ablation=rlcr",
            ],
            cwd=ROOT,
            env=env,
            check=True,
            timeout=120,
            capture_output=True,
        )
        ray = [str(VENV_BIN / "ray"), "job"]
        status = ""
        deadline = time.time() + 150
        while time.time() < deadline:
            status = subprocess.run(
                [*ray, "status", sid, "--address", address],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            ).stdout
            if any(s in status.lower() for s in ("succeeded", "failed", "stopped")):
                break
            time.sleep(2)
        logs = subprocess.run(
            [*ray, "logs", sid, "--address", address], env=env, capture_output=True, text=True, timeout=60
        ).stdout
        assert "succeeded" in status.lower(), f"job status: {status}\n--- logs ---\n{logs[-3000:]}"
        assert "[vlcal] config OK" in logs and "ablation=rlcr" in logs, logs[-3000:]
        pkg = next(line for line in logs.splitlines() if line.startswith("[vlcal] package:"))
        assert str(ROOT) not in pkg, f"the job must import the shipped working_dir copy, got {pkg}"
    finally:
        _stop(head, temp_dir)
    assert head.poll() is not None and not _pids_naming(temp_dir)
