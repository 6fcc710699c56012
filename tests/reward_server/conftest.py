"""Fixtures that start the real reward server (``python -m reward_server``) on 127.0.0.1.

The server runs in a subprocess on a free port with a small pool and tight limits so the limit tests
are cheap; readiness is awaited with a bounded loop on ``/readyz``; the process (and its grading
workers) is terminated at teardown.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 90.0
TEST_LIMITS = {
    "workers": 2,
    "timeout": 2.0,
    "max_items": 16,
    "max_inflight": 16,
    "max_body_bytes": 200_000,
    "max_response_chars": 20_000,
}


@dataclass
class RunningServer:
    url: str
    process: subprocess.Popen

    def client(self, timeout: float = 60.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)

    def worker_pids(self) -> list[int]:
        return [p.pid for p in psutil.Process(self.process.pid).children(recursive=False)]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(extra_env: dict[str, str] | None = None, **limits) -> RunningServer:
    """Start ``python -m reward_server`` with ``limits`` as flags; return once /readyz says ready.
    ``port=`` reuses a port (a restart); a free one by default."""
    port = limits.pop("port", None) or free_port()
    cmd = [sys.executable, "-m", "reward_server", "--host", "127.0.0.1", "--port", str(port)]
    for name, value in {**TEST_LIMITS, **limits}.items():
        cmd += ["--" + name.replace("_", "-"), str(value)]
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": pythonpath, **(extra_env or {})}
    process = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + READY_TIMEOUT_S
    with httpx.Client(base_url=url, timeout=5.0) as http:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"reward server exited with {process.returncode} before it was ready")
            try:
                if http.get("/readyz").status_code == 200:
                    return RunningServer(url, process)
            except httpx.TransportError:
                pass
            time.sleep(0.2)
    stop_server(RunningServer(url, process))
    raise RuntimeError(f"reward server not ready within {READY_TIMEOUT_S} s")


def stop_server(server: RunningServer) -> None:
    """SIGTERM the server's process group (server + grading workers); SIGKILL if it lingers."""
    if server.process.poll() is None:
        os.killpg(server.process.pid, signal.SIGTERM)
        try:
            server.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait(timeout=5)


@pytest.fixture(scope="session")
def server():
    running = start_server()
    try:
        yield running
    finally:
        stop_server(running)


@pytest.fixture
def server_factory():
    """``start(**limits)`` → a server of its own with those settings; all are stopped at teardown."""
    started: list[RunningServer] = []

    def start(**limits) -> RunningServer:
        started.append(start_server(**limits))
        return started[-1]

    try:
        yield start
    finally:
        for running in started:
            stop_server(running)


@pytest.fixture
def fresh_server():
    """A server of its own, for tests of what happens first after start-up."""
    running = start_server()
    try:
        yield running
    finally:
        stop_server(running)
