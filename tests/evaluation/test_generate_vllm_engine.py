"""generate_vllm without a GPU: a stand-in ``vllm`` module checks the engine is built once per process
(``vlcal eval`` calls it once per benchmark) and that a missing vLLM gives the clear error."""

from __future__ import annotations

import sys
import types

import pytest
from PIL import Image

from vlcal_verl.evaluation import generate as gen


class _FakeLLM:
    built = 0

    def __init__(self, **kwargs):
        type(self).built += 1
        self.kwargs = kwargs

    def generate(self, requests, params):
        out = types.SimpleNamespace
        return [out(outputs=[out(text=f"answer {len(r['multi_modal_data']['image'])}")]) for r in requests]


class _FakeProcessor:
    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        return str(messages)


@pytest.fixture
def fake_vllm(monkeypatch):
    _FakeLLM.built = 0
    module = types.ModuleType("vllm")
    module.LLM = _FakeLLM
    module.SamplingParams = lambda **kw: kw
    monkeypatch.setitem(sys.modules, "vllm", module)
    fake_tf = types.ModuleType("transformers")  # stand-in: no need to import the real one here
    fake_tf.AutoProcessor = types.SimpleNamespace(from_pretrained=lambda path: _FakeProcessor())
    monkeypatch.setitem(sys.modules, "transformers", fake_tf)
    gen._vllm_engine.cache_clear()
    yield
    gen._vllm_engine.cache_clear()


def _item(uid: str, n_images: int) -> gen.BenchItem:
    images = tuple(Image.new("RGB", (8, 8)) for _ in range(n_images))
    return gen.BenchItem(uid, "q?", "a", images, "math", "bench")


def test_engine_built_once_across_benchmarks(fake_vllm):
    settings = gen.GenerationSettings()
    first = gen.generate_vllm("/ckpt", [_item("a", 1), _item("b", 3)], settings)
    second = gen.generate_vllm("/ckpt", [_item("c", 2)], settings)
    assert first == ["answer 1", "answer 3"] and second == ["answer 2"]
    assert _FakeLLM.built == 1


def test_missing_vllm_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    gen._vllm_engine.cache_clear()
    with pytest.raises(RuntimeError, match="--backend vllm needs vLLM"):
        gen.generate_vllm("/ckpt", [_item("a", 1)], gen.GenerationSettings())
