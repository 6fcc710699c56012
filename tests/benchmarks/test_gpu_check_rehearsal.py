"""The GPU check rehearsed on this CPU, as it will run on the GPU machine: ``benchmarks/gpu_check.sh`` in an
environment that holds only the GPU image's packages (``benchmarks/gpu_image_packages.txt``) plus the wheels
``benchmarks/gpu_wheels.sh`` downloads, so that the first GPU call does not spend its minutes on an import
error.

The environment is a fresh ``venv --without-pip`` whose site-packages links the image's packages from this
interpreter's (the image's versions differ: torch 2.11 / transformers 5.17 / Python 3.12 there); the wheels
are fetched from PyPI for this Python and installed with ``pip install --no-index --no-deps --target`` by
``gpu_check.sh`` itself. Ray must not be importable there (its wheel does not fit what may travel).
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path, PurePosixPath

import pytest

ROOT = Path(__file__).resolve().parents[2]
PY = f"{sys.version_info.major}.{sys.version_info.minor}"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def image_packages() -> set[str]:
    lines = (ROOT / "benchmarks" / "gpu_image_packages.txt").read_text().splitlines()
    return {_norm(ln) for ln in lines if ln.strip() and not ln.startswith("#")}


def image_venv(dest: Path) -> Path:
    """A venv without pip whose site-packages links only the image's packages (those installed here)."""
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(dest)], check=True)
    site = dest / "lib" / f"python{PY}" / "site-packages"
    allowed = image_packages()
    for dist in md.distributions():
        if _norm(dist.metadata["Name"]) not in allowed:
            continue
        tops = {PurePosixPath(str(f)).parts[0] for f in dist.files or []}
        for top in tops - {".."}:
            src = Path(dist.locate_file(top))
            if top.endswith(".pth") or not src.exists() or (site / top).exists():
                continue
            (site / top).symlink_to(src)
    return dest / "bin" / "python"


def pypi_reachable() -> bool:
    try:
        urllib.request.urlopen("https://pypi.org/simple/verl/", timeout=10).close()
        return True
    except OSError:
        return False


@pytest.mark.slow
def test_gpu_check_runs_with_only_the_image_packages_and_the_carried_wheels(tmp_path):
    if not pypi_reachable():
        pytest.skip("PyPI is unreachable: benchmarks/gpu_wheels.sh cannot download the wheels")
    wheels = tmp_path / "whl"
    env = {**os.environ, "PYTHON": sys.executable}
    got = subprocess.run(
        ["bash", "benchmarks/gpu_wheels.sh", "--python-version", PY, "--dest", str(wheels)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert got.returncode == 0, got.stderr[-3000:]
    assert "budget 50 MiB" in got.stdout
    assert sum(w.stat().st_size for w in wheels.glob("*.whl")) < 50 * 2**20

    python = image_venv(tmp_path / "env")
    for module in ("ray", "verl", "hydra"):  # not in the image: ray must stay so, verl arrives as a wheel
        probe = subprocess.run([str(python), "-c", f"import {module}"], capture_output=True, text=True)
        assert probe.returncode != 0 and "No module named" in probe.stderr, (module, probe.stderr)

    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env |= {"GPU_CHECK_PYTHON": str(python), "GPU_CHECK_PIP": f"{sys.executable} -m pip",
            "GPU_CHECK_WHEELS": str(wheels), "GPU_CHECK_SITE": str(tmp_path / "site")}  # fmt: skip
    run = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--device", "cpu", "--shape", "tiny", "--batch", "2",
         "--response", "24", "--span", "8", "--image", "64", "--warmup", "0", "--repeats", "1",
         "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-5000:])
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["ok"] and report["env"]["ray_import_shim"] is True
    assert report["env"]["verl_file"].startswith(str(tmp_path / "site"))  # the carried wheel, not .venv's
    assert [r["label"].split(":")[0] for r in report["cost"]["rows"]] == [
        "plain old-log-prob (verl", "separate compute_vce", "fused", "fused", "authors' approach"]  # fmt: skip
    fields = report["numerics"]["fields"]
    assert len(fields) == 6 and all(f["ok"] and f["tokens"] > 0 for f in fields)
    assert [c["chunk"] for c in report["numerics"]["chunks"]] == [256, 256, 100, 1 << 20]
    assert {c["name"] for c in report["loss"]["checks"]} >= {"ppo_loss: loss", "TAR: reweighted advantages"}
    assert "| row | time (s) | × plain |" in (out / "gpu_check.md").read_text()
