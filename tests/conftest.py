"""Shared fixtures. Tests mirror the package; `slow`, `integration` and `gpu` markers are strict.

No ``__init__.py`` here: verl 0.9.1 installs a top-level ``tests`` package, so this folder is collected
with ``--import-mode=importlib`` and never imported as ``tests``.
"""

from __future__ import annotations

import os

import pytest

# Ray's single-machine mode (every address it advertises is 127.0.0.1) is read when Ray is imported, so it
# is set before any test imports it; the CPU backend checks it (vlcal_verl.verl_ext.cpu_backend.ray_local).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    if has_cuda:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def benchmark_script():
    """``load(name)`` → the module of ``benchmarks/<name>.py`` (the benchmarks are scripts, not a package)."""
    import importlib.util
    from pathlib import Path

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="session")
def small_demo_assets(tmp_path_factory):
    """Demo data (64 train prompts, 8 held out) and a 100-step warm-started tiny Qwen3-VL with the small BPE
    tokenizer (``demo.tokenizer=small``: ~660 tokens trained on the run's own text, Qwen's special tokens and
    chat template; vlcal_verl.testing.small_tokenizer), built once per session (~15 s on 2 cores) for every
    test that runs verl's loop on Qwen-VL (`root/data`, `root/warm_start`). With Qwen's 151,936-token
    vocabulary a verl step costs several times more (fp32 logits). The InternVL loop uses the small tokenizer
    too, so no verl-loop test runs the real one; it stays covered by the HF rollout server tests (verl's
    ``LLMServerManager`` through Ray on a tiny Qwen3-VL with Qwen's tokenizer, tests/verl_ext/
    test_cpu_rollout.py) and the tokenizer, VCE and evaluation tests."""
    from vlcal_verl.demo.config import DemoConfig
    from vlcal_verl.demo.pipeline import prepare_assets

    root = tmp_path_factory.mktemp("small_demo_assets")
    cfg = DemoConfig(dir=str(root), train_size=64, eval_size=8, warm_start_steps=100, tokenizer="small")
    prepare_assets(cfg, root, {})
    return root


@pytest.fixture(autouse=True)
def _restore_environ():
    """Each test leaves ``os.environ`` as it found it. The entry point's ``prepare`` (run in-process by the
    recipe and CLI tests) exports the CPU backend's variables — ``VERL_PLATFORM=cpu``,
    ``OMP_NUM_THREADS=1`` … — into the test process, where every later test of the same process (or
    pytest-xdist worker) and its children would inherit them: a fresh ``import verl`` with the plugins
    switched off then fails on the unknown ``cpu`` platform."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)
