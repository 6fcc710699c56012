"""Tiny random VLMs shared by the VCE/TAR tests (built once per session into a temp cache)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    return os.environ.get("VLCAL_CACHE") or str(tmp_path_factory.mktemp("vlcal_cache"))


@pytest.fixture(scope="session")
def tiny_vlms(tiny_cache):
    """{family: (model, processor)} for qwen3-vl and qwen2.5-vl, float32, eval mode."""
    from vlcal_verl.testing.tiny_models import load_tiny_vlm

    out = {}
    for fam in ("qwen3-vl", "qwen2.5-vl"):
        out[fam] = load_tiny_vlm(fam, cache_dir=os.path.join(tiny_cache, "tiny"))
    return out
