"""A Ray cluster on one machine for tests: a head and worker nodes started with ``ray start`` on 127.0.0.1.

Each node is a real Ray node (its own raylet, object store, temp dir and ports) declaring the logical
accelerator slots the CPU backend places FSDP ranks on (``--num-gpus``), as a cluster's nodes do. Jobs go
through ``launch/submit.sh`` to the head's dashboard, exactly as on a cluster; the job's driver joins the
cluster (:func:`vlcal_verl.verl_ext.cpu_backend.ray_local.join_job_cluster`).

Every process a node starts is a descendant of its ``ray start --block`` process until a parent dies, so
:meth:`LocalCluster.track` records (pid, start time) of all descendants whenever a test looks, and
:meth:`LocalCluster.stop` ends each recorded process that is still the same process, then every process
naming a node's temp dir (:func:`~vlcal_verl.testing.ray_local.stop_processes_under`) — never anything
else. Ray workers rename themselves (``ray::…``), so names alone would miss them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from vlcal_verl.testing.ray_local import LOCAL_IP, new_ray_temp_dir, private_ray_env, stop_processes_under

ROOT = Path(__file__).resolve().parents[2]
SUBMIT = ROOT / "launch" / "submit.sh"
BIN = Path(sys.executable).parent
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOCAL_IP, 0))
        return s.getsockname()[1]


def cluster_env() -> dict[str, str]:
    """This machine's environment without another cluster's address or token, with the venv's ``ray``
    and ``python`` first on PATH (the job's entrypoint runs ``python``), multi-node Ray allowed, and no
    idle workers pre-started (each costs a Python start on a 2-core machine)."""
    env = private_ray_env()
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "1"  # the Linux default; ray start refuses a worker with 0
    # loopback only, and the in-process job/state clients carry no token: auth off for this cluster alone
    # (a token left in ~/.ray would switch it on; the token path is test_verl_launch_ray's)
    env["RAY_AUTH_MODE"] = "disabled"
    env["RAY_prestart_worker_first_driver"] = "0"
    env["RAY_enable_worker_prestart"] = "0"
    env["VLCAL_PYTHON"] = sys.executable
    env["VLCAL_RAY"] = str(BIN / "ray")
    return env


@dataclass
class Node:
    """One ``ray start --block`` process and its private temp dir."""

    name: str
    proc: subprocess.Popen
    temp_dir: Path
    gpus: int

    def raylet(self) -> psutil.Process:
        """This node's raylet (a direct child of its ``ray start``)."""
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if Path(child.exe()).name == "raylet" or child.name() == "raylet":
                    return child
        raise RuntimeError(f"node {self.name}: no raylet under ray start pid {self.proc.pid}")


@dataclass
class LocalCluster:
    """A head (dashboard on ``address``) and its worker nodes, all on 127.0.0.1."""

    env: dict[str, str] = field(default_factory=cluster_env)
    nodes: list[Node] = field(default_factory=list)
    seen: dict[int, float] = field(default_factory=dict)
    gcs: str = ""
    address: str = ""

    def _start(self, name: str, args: list[str], gpus: int, cpus: int) -> Node:
        temp = new_ray_temp_dir()
        cmd = [
            str(BIN / "ray"), "start", "--block", "--node-ip-address", LOCAL_IP, "--num-gpus", str(gpus),
            "--num-cpus", str(cpus), "--temp-dir", str(temp), "--object-store-memory", str(200 * 1024**2),
            "--disable-usage-stats", *args,
            # per-node ports that default to fixed numbers: two nodes (or another Ray) on one machine would
            # collide, and a head whose dashboard agent lost port 52365 refuses every job submission
            "--dashboard-agent-listen-port", str(free_port()), "--metrics-export-port", str(free_port()),
        ]  # fmt: skip
        log = open(temp / f"{name}.log", "wb")  # noqa: SIM115 - the node outlives this call
        proc = subprocess.Popen(
            cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        node = Node(name, proc, temp, gpus)
        self.nodes.append(node)
        return node

    def start_head(self, gpus: int, cpus: int = 16) -> Node:
        """A head declaring ``gpus`` logical accelerator slots; waits for its job API."""
        port, dash = free_port(), free_port()
        args = ["--head", "--port", str(port), "--dashboard-host", LOCAL_IP, "--dashboard-port", str(dash)]
        head = self._start("head", args, gpus, cpus)
        self.gcs, self.address = f"{LOCAL_IP}:{port}", f"http://{LOCAL_IP}:{dash}"
        self._wait(lambda: _http_ok(f"{self.address}/api/version"), head, "the head's job API", 90)
        return head

    def start_worker(self, gpus: int, cpus: int = 8) -> Node:
        """A worker node joining the head; waits until the cluster counts its slots."""
        want = sum(n.gpus for n in self.nodes if n.proc.poll() is None) + gpus
        node = self._start(f"worker{len(self.nodes)}", ["--address", self.gcs], gpus, cpus)
        self._wait(lambda: self.total_gpus() >= want, node, f"{want} GPU slots in the cluster", 90)
        return node

    def _wait(self, ready, node: Node, what: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            if node.proc.poll() is not None:
                log = (node.temp_dir / f"{node.name}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"ray start ({node.name}) exited {node.proc.returncode}:\n{log}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout_s:.0f} s for {what}")
            time.sleep(0.5)
        self.track()

    def total_gpus(self) -> float:
        """Logical GPUs of the alive nodes, as the head's GCS counts them."""
        from ray.util.state import list_nodes

        try:
            nodes = list_nodes(address=self.address, filters=[("state", "=", "ALIVE")], detail=True)
        except Exception:  # the API is not up yet
            return 0.0
        return sum(float(n.resources_total.get("GPU", 0)) for n in nodes)

    def track(self) -> None:
        """Record every process now under a node's ``ray start`` (pid → start time)."""
        for node in self.nodes:
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(node.proc.pid)
                for p in [root, *root.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):
                        self.seen.setdefault(p.pid, p.create_time())

    def alive_tracked(self, pids: list[int] | None = None) -> list[int]:
        """Recorded processes (or those of ``pids`` recorded) that still run."""
        return [
            pid
            for pid in (self.seen if pids is None else pids)
            if pid in self.seen and _same_process(pid, self.seen[pid])
        ]

    def stop_node(self, node: Node) -> None:
        """SIGTERM, then SIGKILL, one node's process group and every process naming its temp dir."""
        self.track()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            node.proc.wait(timeout=5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.proc.pid, signal.SIGKILL)
        stop_processes_under(node.temp_dir)

    def stop(self) -> list[int]:
        """Stop every node, then SIGKILL every recorded process that outlived its node (workers a dead
        raylet left behind); return the recorded PIDs still running after that (none expected)."""
        for node in reversed(self.nodes):
            self.stop_node(node)
        for pid in self.alive_tracked():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while (left := self.alive_tracked()) and time.monotonic() < deadline:
            time.sleep(0.2)
        for node in self.nodes:
            shutil.rmtree(node.temp_dir, ignore_errors=True)
        return left

    # ---- jobs --------------------------------------------------------------------------------------

    def submit(
        self, sid: str, nodes: int, gpus: int, overrides: list[str], recipe: str = "recipes/tiny_cpu.yaml"
    ):
        """``launch/submit.sh --no-wait`` to this cluster's head; returns the finished submit process."""
        cmd = [
            str(SUBMIT), "--recipe", recipe, "--address", self.address, "--nodes", str(nodes),
            "--gpus-per-node", str(gpus), "--submission-id", sid, "--no-wait", "--", *overrides,
        ]  # fmt: skip
        proc = subprocess.run(cmd, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"submit.sh failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        return proc

    def client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.address)

    def status(self, sid: str) -> str:
        return str(self.client().get_job_status(sid).value)

    def wait_for(self, sid: str, ready, what: str, timeout_s: float, poll_s: float = 1.0) -> float:
        """Poll until ``ready()``; fail naming ``what`` with the job's log tail if the job ends first or
        the time runs out. Returns the monotonic time it became ready."""
        deadline = time.monotonic() + timeout_s
        while True:
            if ready():
                self.track()
                return time.monotonic()
            status = self.status(sid)
            if status in TERMINAL:
                raise AssertionError(f"job {sid} ended {status} before {what}:\n{self.logs(sid)[-6000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not within {timeout_s:.0f} s:\n{self.logs(sid)[-6000:]}")
            self.track()
            time.sleep(poll_s)

    def wait_end(self, sid: str, timeout_s: float) -> str:
        """The job's terminal status, polled every 0.5 s."""
        deadline = time.monotonic() + timeout_s
        while (status := self.status(sid)) not in TERMINAL:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"job {sid} still {status} after {timeout_s:.0f} s:\n{self.logs(sid)[-6000:]}"
                )
            self.track()
            time.sleep(0.5)
        return status

    def logs(self, sid: str) -> str:
        return self.client().get_job_logs(sid)

    def driver_pid(self, sid: str) -> int:
        """The PID of the job's driver (``python -m vlcal_verl.main``), as Ray reports it."""
        info = self.client().get_job_info(sid)
        assert info.driver_info is not None, f"job {sid} has no driver yet"
        return int(info.driver_info.pid)

    def actors(self, sid: str) -> list:
        """The job's actors from Ray's state API (class, node id, pid, state)."""
        from ray.util.state import list_actors

        job_id = self.client().get_job_info(sid).job_id
        return [a for a in list_actors(address=self.address, detail=True, limit=10000) if a.job_id == job_id]


def _http_ok(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=3)
        return True
    except OSError:
        return False


def _same_process(pid: int, create_time: float) -> bool:
    try:
        p = psutil.Process(pid)
        return p.create_time() == create_time and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
