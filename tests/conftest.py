"""Shared fixtures. Tests mirror the package; `slow`, `integration` and `gpu` markers are strict.

No ``__init__.py`` here: verl 0.9.1 installs a top-level ``tests`` package, so this folder is collected
with ``--import-mode=importlib`` and never imported as ``tests``.
"""

from __future__ import annotations

import pytest


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
