"""A private Ray for tests: 127.0.0.1 only, its own temp dir, and every process it started stopped.

``ray.shutdown()`` normally stops the head that ``ray.init`` started, but a crashed test can leave a
raylet or worker behind. Each private Ray gets its own ``_temp_dir``; every Ray process names that
directory on its command line (``--temp-dir``, ``--session-dir``, socket paths), so
:func:`stop_processes_under` finds exactly the processes this Ray started — never another user's Ray.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

LOCAL_IP = "127.0.0.1"


def private_ray_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default ``os.environ``) without what would join another cluster or demand a token."""
    out = dict(os.environ if env is None else env)
    for key in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        out.pop(key, None)
    out["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    out.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return out


def new_ray_temp_dir() -> Path:
    """A short private directory (Ray's unix-socket paths must stay under ~107 characters)."""
    return Path(tempfile.mkdtemp(prefix="vlray-", dir="/tmp"))


def stop_processes_under(temp_dir: str | os.PathLike, timeout_s: float = 10.0) -> list[int]:
    """SIGTERM, then SIGKILL, every process whose command line mentions ``temp_dir``; return their PIDs."""
    needle = str(temp_dir)
    mine = os.getpid()
    procs = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.info["pid"] != mine and any(needle in part for part in (p.info["cmdline"] or [])):
                procs.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    return [p.pid for p in procs]


@contextlib.contextmanager
def private_ray(num_cpus: int = 4, num_gpus: int = 0) -> Iterator[Path]:
    """``ray.init`` a fresh local head on 127.0.0.1 in this process; yield its temp dir; stop it all."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(private_ray_env(saved))
    temp_dir = new_ray_temp_dir()
    import ray

    try:
        ray.init(
            address="local",
            _node_ip_address=LOCAL_IP,
            include_dashboard=False,
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            _temp_dir=str(temp_dir),
        )
        yield temp_dir
    finally:
        with contextlib.suppress(Exception):
            ray.shutdown()
        time.sleep(0.5)
        stop_processes_under(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        os.environ.clear()
        os.environ.update(saved)
