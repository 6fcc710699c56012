"""generate_vllm without a GPU: a stand-in ``vllm`` module checks the engine is built once per process, the
engine options reach ``vllm.LLM``, truncation is read from vLLM's finish reason, and ``--dp`` shards the
items over one engine per GPU group (in spawned processes) and merges the results back in order."""

from __future__ import annotations

import sys
import types
from typing import ClassVar

import pytest
from PIL import Image

from vlcal_verl.evaluation import generate as gen

FAKE_VLLM = """
import os
from types import SimpleNamespace as NS

class LLM:
    def __init__(self, **kwargs):
        self.kwargs = kwargs

    def generate(self, requests, params):
        gpus = os.environ.get("CUDA_VISIBLE_DEVICES")
        return [
            NS(outputs=[NS(text=f"{r['prompt']}|gpus={gpus}|tp={self.kwargs['tensor_parallel_size']}",
                           token_ids=[1] * (3 + i), finish_reason="length" if i % 2 else "stop")])
            for i, r in enumerate(requests)
        ]

def SamplingParams(**kw):
    return kw
"""


class _FakeLLM:
    built = 0
    last_kwargs: ClassVar[dict] = {}
    last_params: ClassVar[dict] = {}

    def __init__(self, **kwargs):
        type(self).built += 1
        type(self).last_kwargs = kwargs

    def generate(self, requests, params):
        type(self).last_params = params
        out = types.SimpleNamespace
        return [
            out(
                outputs=[
                    out(
                        text=f"answer {len(r['multi_modal_data']['image'])}",
                        token_ids=[7] * len(r["multi_modal_data"]["image"]),
                        finish_reason="length" if len(r["multi_modal_data"]["image"]) == 3 else "stop",
                    )
                ]
            )
            for r in requests
        ]


class _FakeProcessor:
    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        return messages[0]["content"][-1]["text"].strip().split("\n")[0]  # the question


def _fake_transformers(monkeypatch):
    fake_tf = types.ModuleType("transformers")  # stand-in: no need to import the real one here
    fake_tf.AutoProcessor = types.SimpleNamespace(from_pretrained=lambda path: _FakeProcessor())
    monkeypatch.setitem(sys.modules, "transformers", fake_tf)


@pytest.fixture
def fake_vllm(monkeypatch):
    _FakeLLM.built = 0
    module = types.ModuleType("vllm")
    module.LLM = _FakeLLM
    module.SamplingParams = lambda **kw: kw
    monkeypatch.setitem(sys.modules, "vllm", module)
    _fake_transformers(monkeypatch)
    gen._vllm_engine.cache_clear()
    yield
    gen._vllm_engine.cache_clear()


def _item(uid: str, n_images: int, question: str = "q?") -> gen.BenchItem:
    images = tuple(Image.new("RGB", (8, 8)) for _ in range(n_images))
    return gen.BenchItem(uid, question, "a", images, "math", "bench")


def test_engine_built_once_across_calls_and_truncation_read(fake_vllm):
    settings = gen.GenerationSettings()
    first = gen.generate_vllm("/ckpt", [_item("a", 1), _item("b", 3)], settings)
    second = gen.generate_vllm("/ckpt", [_item("c", 2)], settings)
    assert [g.text for g in first] == ["answer 1", "answer 3"] and second[0].text == "answer 2"
    assert [(g.n_tokens, g.truncated) for g in first] == [(1, False), (3, True)]
    assert _FakeLLM.built == 1


def test_engine_options_and_sampling_reach_vllm(fake_vllm):
    options = gen.VLLMOptions(tp=2, gpu_memory_utilization=0.5, max_model_len=8192, max_num_seqs=64)
    settings = gen.GenerationSettings(max_new_tokens=4096, top_k=20, seed=3)
    gen.generate_vllm("/ckpt", [_item("a", 1)], settings, options)
    kw = _FakeLLM.last_kwargs
    assert (kw["model"], kw["tensor_parallel_size"], kw["gpu_memory_utilization"]) == ("/ckpt", 2, 0.5)
    assert (kw["max_model_len"], kw["max_num_seqs"], kw["seed"]) == (8192, 64, 3)
    assert _FakeLLM.last_params == {
        "temperature": 0.6,
        "top_p": 0.95,
        "max_tokens": 4096,
        "seed": 3,
        "top_k": 20,
    }
    gen.generate_vllm("/ckpt", [_item("a", 1)], gen.GenerationSettings())  # other options: a new engine
    assert "max_model_len" not in _FakeLLM.last_kwargs and "top_k" not in _FakeLLM.last_params


def test_missing_vllm_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    gen._vllm_engine.cache_clear()
    with pytest.raises(RuntimeError, match="--backend vllm needs vLLM"):
        gen.generate_vllm("/ckpt", [_item("a", 1)], gen.GenerationSettings())


def test_gpu_groups_and_shards():
    assert gen.gpu_groups(4, 2) == ["0,1", "2,3", "4,5", "6,7"]
    assert gen.gpu_groups(2, 2, "3, 5,6,7") == ["3,5", "6,7"]
    with pytest.raises(ValueError, match="needs 4 GPUs"):
        gen.gpu_groups(2, 2, "0,1,2")
    shards = gen.shard_indices(7, 3)
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]
    assert gen.merge_shards(shards, [["a", "d", "g"], ["b", "e"], ["c", "f"]]) == list("abcdefg")
    with pytest.raises(RuntimeError, match="returned 1 outputs for 2"):
        gen.merge_shards(shards, [["a", "d", "g"], ["b"], ["c", "f"]])


def test_dp_shards_over_gpu_groups_and_merges_in_order(fake_vllm, monkeypatch):
    """An in-process launcher stands in for the spawned engines: each job sees its own GPU group."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    seen = []

    def launcher(jobs):
        out = []
        for env, kwargs, requests, _params in jobs:
            seen.append((env["CUDA_VISIBLE_DEVICES"], kwargs["tensor_parallel_size"], len(requests)))
            out.append(
                [gen.Generation(f"{r['prompt']}@{env['CUDA_VISIBLE_DEVICES']}", 1, False) for r in requests]
            )
        return out

    items = [_item(str(i), 1, question=f"q{i}") for i in range(5)]
    got = gen.generate_vllm("/ckpt", items, gen.GenerationSettings(), gen.VLLMOptions(tp=2, dp=2), launcher)
    assert seen == [("4,5", 2, 3), ("6,7", 2, 2)]
    assert [g.text for g in got] == ["q0@4,5", "q1@6,7", "q2@4,5", "q3@6,7", "q4@4,5"]


def test_dp_spawned_engines_see_their_gpus(tmp_path, monkeypatch):
    """The real launcher: one spawned process per engine, a fake ``vllm`` package on the path."""
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "__init__.py").write_text(FAKE_VLLM)
    monkeypatch.syspath_prepend(str(tmp_path))  # spawned children get the parent's sys.path
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    _fake_transformers(monkeypatch)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3,5")
    items = [_item(str(i), 1, question=f"q{i}") for i in range(5)]
    got = gen.generate_vllm("/ckpt", items, gen.GenerationSettings(), gen.VLLMOptions(tp=1, dp=3))
    # round-robin shards [0, 3], [1, 4], [2] on GPUs 2, 3, 5; the fake marks odd positions in a shard truncated
    assert [g.text for g in got] == [f"q{i}|gpus={'235'[i % 3]}|tp=1" for i in range(5)]
    assert [g.truncated for g in got] == [False, False, False, True, True]
    assert [g.n_tokens for g in got] == [3, 3, 3, 4, 4]
