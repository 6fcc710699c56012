"""cpu_backend.rollout: the HF ``generate`` rollout server behind verl's agent loop, on the tiny Qwen3-VL.

Unit tests drive :class:`HFRolloutServer` directly (no Ray): seeded sampling is reproducible, returned
log-probs equal a brute-force ``log_softmax(logits / T)`` from one full forward of prompt + response
(text and image prompts), vision tokens are never sampled even when the model prefers them, EOS and
``max_tokens`` stop generation, abort/resume behave like vLLM's gate, and ``HFServerAdapter`` pushes
weights that change the output. The integration test launches the replica's server as a Ray actor on
127.0.0.1 and goes through the same names verl uses (``get_rollout_replica_class`` / ``get_actor``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Any

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SEED_A, SEED_B = 0, 1


@pytest.fixture(scope="module")
def tiny_paths(tmp_path_factory) -> dict[int, str]:
    from vlcal_verl.testing.tiny_models import build_tiny_vlm

    cache = os.environ.get("VLCAL_CACHE")
    root = os.path.join(cache, "tiny") if cache else str(tmp_path_factory.mktemp("tiny"))
    return {seed: str(build_tiny_vlm("qwen3-vl", cache_dir=root, seed=seed)) for seed in (SEED_A, SEED_B)}


def _configs(path: str, **rollout: Any):
    from verl.workers.config import HFModelConfig, RolloutConfig

    model_config = HFModelConfig(path=path, override_config={"attn_implementation": "sdpa"})
    kwargs = dict(
        name="hf",
        dtype="fp32",
        load_format="auto",
        prompt_length=256,
        response_length=12,
        tensor_model_parallel_size=1,
    )
    kwargs.update(rollout)
    return RolloutConfig(**kwargs), model_config


@pytest.fixture(scope="module")
def server(tiny_paths):
    from vlcal_verl.verl_ext.cpu_backend.rollout import HFRolloutServer

    return HFRolloutServer(*_configs(tiny_paths[SEED_A]))


def _text_prompt(server, text: str = "Describe the weather today.") -> list[int]:
    tok = server.model_config.tokenizer
    enc = tok.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
    )
    return list(enc["input_ids"] if hasattr(enc, "keys") else enc)


def _image_prompt(server) -> tuple[list[int], list[Any]]:
    """Prompt ids as verl's agent loop builds them (processor render: image pads already expanded)."""
    from PIL import Image

    proc = server.model_config.processor
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
    text = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ids = proc(text=[text], images=[image], return_tensors="pt")["input_ids"][0].tolist()
    return ids, [image]


def _gen(server, prompt_ids, **sampling: Any):
    images = sampling.pop("image_data", None)
    return asyncio.run(server.generate(prompt_ids, dict(sampling), request_id="r", image_data=images))


def _brute_force_log_probs(server, prompt_ids, response_ids, temperature, images=None) -> torch.Tensor:
    """``[T]``: ``log_softmax(logits / T)`` of each response token from one full forward (no cache)."""
    from vlcal_verl.verl_ext.cpu_backend.hf_inputs import build_mm_inputs

    ids, mm = build_mm_inputs(server.model_config.processor, prompt_ids, images, None)
    full = torch.tensor([ids + response_ids])
    if "mm_token_type_ids" in mm:
        pad = torch.zeros(1, len(response_ids), dtype=torch.long)
        mm["mm_token_type_ids"] = torch.cat([mm["mm_token_type_ids"], pad], dim=1)
    model = server.engine.model
    with torch.no_grad():
        logits = model(input_ids=full, attention_mask=torch.ones_like(full), **mm).logits[0].float()
    steps = logits[len(ids) - 1 : len(ids) - 1 + len(response_ids)]
    rows = torch.log_softmax(steps / temperature, dim=-1)
    return rows.gather(-1, torch.tensor(response_ids).unsqueeze(-1)).squeeze(-1)


@contextlib.contextmanager
def _logit_boost(server, token_ids: list[int], amount: float = 1e4):
    """Make the model's raw logits overwhelmingly prefer ``token_ids`` (forward hook on ``lm_head``)."""
    ids = torch.tensor(token_ids)

    def hook(_module, _inputs, output):
        output = output.clone()
        output[..., ids] += amount
        return output

    handle = server.engine.model.lm_head.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


# ---------------------------------------------------------------------------------------------------


def test_register_rollout_resolves_through_verls_lookups():
    from verl.workers.rollout.base import get_rollout_class
    from verl.workers.rollout.replica import get_rollout_replica_class

    from vlcal_verl.verl_ext.cpu_backend.rollout import HFReplica, HFServerAdapter, register_rollout

    assert register_rollout() == "hf"
    assert register_rollout() == "hf"  # idempotent
    assert get_rollout_replica_class("hf") is HFReplica
    assert get_rollout_class("hf", "async") is HFServerAdapter


def test_resolve_sampling_mirrors_vllm_defaults(server):
    from vlcal_verl.verl_ext.cpu_backend.hf_inputs import resolve_sampling

    cfg = server.config  # prompt_length 256, response_length 12, max_model_len 4096 (tiny)
    assert resolve_sampling({}, cfg, prompt_len=10).max_tokens == 12
    assert resolve_sampling({}, cfg, prompt_len=260).max_tokens == 256 + 12 - 260
    assert resolve_sampling({"max_tokens": 5}, cfg, prompt_len=10).max_tokens == 5
    assert resolve_sampling({"max_new_tokens": 7}, cfg, prompt_len=10).max_tokens == 7
    assert resolve_sampling({"max_tokens": 10**6}, cfg, prompt_len=10).max_tokens == cfg.max_model_len - 10
    spec = resolve_sampling(
        {"temperature": 0, "top_k": -1, "top_p": 1.0, "logprobs": True}, cfg, prompt_len=3
    )
    assert spec.greedy and spec.logprobs and spec.top_k == -1 and spec.seed is None
    with pytest.raises(ValueError, match="unsupported"):
        resolve_sampling({"best_of": 2}, cfg, prompt_len=3)
    with pytest.raises(ValueError, match="no room"):
        resolve_sampling({}, cfg, prompt_len=cfg.max_model_len)


def test_full_determinism_repeats_a_steps_samples_and_keeps_copies_apart(tiny_paths, server):
    """``rollout.full_determinism``: verl's TransferQueue loop sends the ``n`` copies of a prompt as identical
    requests (all named ``det-0``). They sample differently from each other, and a fresh server — another
    replica, or the same one at the next weights version — repeats the same samples, whatever unseeded
    requests ran in between."""
    from vlcal_verl.verl_ext.cpu_backend.rollout import HFRolloutServer

    det = HFRolloutServer(*_configs(tiny_paths[SEED_A], full_determinism=True), replica_rank=0)
    other = HFRolloutServer(*_configs(tiny_paths[SEED_A], full_determinism=True), replica_rank=1)
    prompt, red = _text_prompt(server), _text_prompt(server, "Describe a red square.")
    params = dict(temperature=1.0, top_p=1.0, top_k=-1, logprobs=True, ignore_eos=True)

    def group(srv, ids=prompt, n=4):
        return [asyncio.run(srv.generate(ids, dict(params), request_id="det-0")).token_ids for _ in range(n)]

    asyncio.run(det.set_global_steps(1))
    first = group(det)
    assert len({tuple(t) for t in first}) == 4  # the copies differ
    asyncio.run(other.set_global_steps(1))
    _gen(other, prompt, **params)  # an unseeded request first: draws from the server's own generator
    assert group(other) == first  # the other replica samples the same group
    asyncio.run(det.set_global_steps(2))  # the next weights version: arrivals counted afresh
    assert group(det, red, 2) != first[:2]
    assert group(det) == first  # interleaved with another prompt's group, the same samples


def test_seeded_sampling_is_reproducible(server):
    prompt = _text_prompt(server)
    params = dict(temperature=1.0, top_p=1.0, top_k=-1, logprobs=True, ignore_eos=True)
    a = _gen(server, prompt, seed=123, **params)
    b = _gen(server, prompt, seed=123, **params)
    c = _gen(server, prompt, seed=124, **params)
    assert a.token_ids == b.token_ids and a.log_probs == b.log_probs
    assert len(a.token_ids) == 12 and a.token_ids != c.token_ids
    assert a.stop_reason == "completed" and a.extra_fields["global_steps"] is None


@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_log_probs_equal_temperature_scaled_full_forward(server, temperature):
    prompt = _text_prompt(server)
    # top-k/top-p restrict sampling only: the returned log-probs are over the full vocabulary
    out = _gen(
        server, prompt, temperature=temperature, top_k=50, top_p=0.9, logprobs=True, seed=7, ignore_eos=True
    )
    expected = _brute_force_log_probs(server, prompt, out.token_ids, temperature)
    assert len(out.log_probs) == len(out.token_ids) == 12
    torch.testing.assert_close(torch.tensor(out.log_probs), expected, atol=1e-4, rtol=1e-4)


def test_greedy_log_probs_use_temperature_one(server):
    prompt = _text_prompt(server)
    out = _gen(server, prompt, temperature=0, logprobs=True, ignore_eos=True, max_tokens=6)
    expected = _brute_force_log_probs(server, prompt, out.token_ids, 1.0)
    torch.testing.assert_close(torch.tensor(out.log_probs), expected, atol=1e-4, rtol=1e-4)
    assert (
        _gen(server, prompt, temperature=0, logprobs=False, ignore_eos=True, max_tokens=6).log_probs is None
    )


def test_image_prompt_generates_with_matching_log_probs(server):
    prompt, images = _image_prompt(server)
    image_id = server.model_config.processor.image_token_id
    assert prompt.count(image_id) > 1  # the agent loop's ids arrive expanded
    out = _gen(server, prompt, image_data=images, temperature=1.0, logprobs=True, seed=3, ignore_eos=True)
    expected = _brute_force_log_probs(server, prompt, out.token_ids, 1.0, images=images)
    torch.testing.assert_close(torch.tensor(out.log_probs), expected, atol=1e-4, rtol=1e-4)


def test_collapsed_image_pads_are_expanded(server):
    from vlcal_verl.verl_ext.cpu_backend.hf_inputs import align_placeholders, build_mm_inputs

    prompt, images = _image_prompt(server)
    image_id = server.model_config.processor.image_token_id
    collapsed = [
        t for i, t in enumerate(prompt) if not (t == image_id and i > 0 and prompt[i - 1] == image_id)
    ]
    ids, mm = build_mm_inputs(server.model_config.processor, collapsed, images, None)
    assert ids == prompt and mm["image_grid_thw"].tolist() == [[1, 4, 4]]
    assert mm["mm_token_type_ids"][0].tolist() == [int(t == image_id) for t in prompt]
    with pytest.raises(ValueError, match="placeholder"):
        align_placeholders([1, image_id, image_id, 2], image_id, [4])


def test_vision_tokens_are_never_sampled(server):
    from vlcal_verl.verl_ext.cpu_backend.hf_inputs import banned_token_ids

    banned = banned_token_ids(server.model_config.processor, server.model_config.hf_config)
    assert {151652, 151653, 151654, 151655, 151656} <= set(banned)
    prompt, images = _image_prompt(server)
    with _logit_boost(server, banned):
        for temperature in (0, 1.0):
            out = _gen(server, prompt, image_data=images, temperature=temperature, seed=1, ignore_eos=True)
            assert len(out.token_ids) == 12 and not set(out.token_ids) & set(banned)


def test_stops_at_eos_and_respects_max_tokens(server):
    eos = server.model_config.tokenizer.eos_token_id
    prompt = _text_prompt(server)
    with _logit_boost(server, [eos]):
        out = _gen(server, prompt, temperature=1.0, seed=0)
        assert out.token_ids == [eos] and out.stop_reason == "completed"
        assert (
            len(_gen(server, prompt, temperature=1.0, seed=0, ignore_eos=True, max_tokens=5).token_ids) == 5
        )
    assert len(_gen(server, prompt, temperature=0, ignore_eos=True, max_tokens=3).token_ids) == 3


def test_abort_stops_in_flight_and_gates_new_requests(server):
    prompt = _text_prompt(server)

    async def scenario():
        long = asyncio.create_task(
            server.generate(prompt, {"max_tokens": 3000, "ignore_eos": True}, request_id="long")
        )
        await asyncio.sleep(0.5)
        report = await server.abort_all_requests(reject_request=True)
        aborted = await long
        rejected = await server.generate(prompt, {"max_tokens": 2}, request_id="late")
        await server.resume_generation()
        resumed = await server.generate(prompt, {"max_tokens": 2, "ignore_eos": True}, request_id="after")
        return report, aborted, rejected, resumed

    report, aborted, rejected, resumed = asyncio.run(scenario())
    assert report["aborted_count"] == 1
    assert aborted.stop_reason == "aborted" and len(aborted.token_ids) < 3000
    assert rejected.stop_reason == "aborted" and rejected.token_ids == []
    assert resumed.stop_reason == "completed" and len(resumed.token_ids) == 2


class _LocalActor:
    """``handle.method.remote(...)`` → an awaitable on a local object (a Ray actor handle stand-in)."""

    def __init__(self, obj: Any) -> None:
        self._obj = obj
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._obj, name)
        calls = self.calls

        class _Remote:
            @staticmethod
            def remote(*args: Any, **kwargs: Any):
                calls.append(name)
                result = method(*args, **kwargs)
                return result if asyncio.iscoroutine(result) else asyncio.sleep(0, result)

        return _Remote()


def test_adapter_update_weights_changes_output(tiny_paths, monkeypatch):
    from transformers import AutoModelForImageTextToText
    from verl.workers.config import CheckpointEngineConfig

    from vlcal_verl.verl_ext.cpu_backend.rollout import HFRolloutServer, HFServerAdapter

    bucket_1mb = CheckpointEngineConfig(update_weights_bucket_megabytes=1)
    config, model_config = _configs(tiny_paths[SEED_A], checkpoint_engine=bucket_1mb)
    srv = HFRolloutServer(config, model_config)
    target = AutoModelForImageTextToText.from_pretrained(tiny_paths[SEED_B], dtype=torch.float32)
    reference = HFRolloutServer(*_configs(tiny_paths[SEED_B]))
    prompt = _text_prompt(srv)
    greedy = dict(temperature=0, ignore_eos=True, logprobs=True)
    before = _gen(srv, prompt, **greedy)

    monkeypatch.setenv("RANK", "0")
    adapter = HFServerAdapter(config, model_config, device_mesh=None)
    adapter.server_handle = handle = _LocalActor(srv)
    # FSDP-style names, bf16 like verl's engine export; sent as a plain generator
    weights = (
        (f"_fsdp_wrapped_module.{n}", t.detach().to(torch.bfloat16)) for n, t in target.state_dict().items()
    )
    asyncio.run(adapter.update_weights(weights, global_steps=5, peft_config=None, base_sync_done=True))

    after = _gen(srv, prompt, **greedy)
    expected = _gen(reference, prompt, **greedy)
    assert handle.calls.count("load_weights") > 2  # bucketed by update_weights_bucket_megabytes
    assert after.token_ids != before.token_ids and after.extra_fields["global_steps"] == 5
    assert srv.engine.missing_weights() == []
    # bf16 transport: same tokens as the reference, log-probs within bf16 rounding
    assert after.token_ids == expected.token_ids
    torch.testing.assert_close(
        torch.tensor(after.log_probs), torch.tensor(expected.log_probs), atol=0.05, rtol=0
    )


def test_adapter_non_leader_drains_without_a_server(monkeypatch, tiny_paths):
    from vlcal_verl.verl_ext.cpu_backend.rollout import HFServerAdapter

    config, model_config = _configs(tiny_paths[SEED_A], tensor_model_parallel_size=2)
    monkeypatch.setenv("RANK", "3")
    adapter = HFServerAdapter(config, model_config, device_mesh=None)
    assert (adapter.replica_rank, adapter.rollout_rank, adapter.is_leader_rank) == (1, 1, False)
    seen = []

    def weights():
        for i in range(3):
            seen.append(i)
            yield f"w{i}", torch.zeros(2)

    asyncio.run(adapter.update_weights(weights(), global_steps=1))
    assert seen == [0, 1, 2] and adapter.server_handle is None
    with pytest.raises(NotImplementedError):
        asyncio.run(adapter.update_weights(iter(()), wire_format="delta_flush"))


class _HybridWorkerGroup:
    """What ``LLMServerManager`` reads of the hybrid worker group: its size and worker handles."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.workers: list[Any] = []  # no FSDP workers here: servers skip node affinity


def _verl_config(path: str):
    """verl's own ``ppo_trainer`` config with the rollout switched to ``hf`` (what a CPU run sets)."""
    from hydra import compose, initialize_config_module

    overrides = [
        f"actor_rollout_ref.model.path={path}",
        "actor_rollout_ref.rollout.name=hf",
        "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
        "actor_rollout_ref.rollout.dtype=float32",
        "actor_rollout_ref.rollout.prompt_length=64",
        "actor_rollout_ref.rollout.response_length=4",
        "actor_rollout_ref.rollout.calculate_log_probs=true",
        "actor_rollout_ref.rollout.checkpoint_engine.update_weights_bucket_megabytes=1",
    ]
    with initialize_config_module("verl.trainer.config", version_base=None):
        return compose(config_name="ppo_trainer", overrides=overrides)


@pytest.mark.integration
def test_llm_server_manager_generates_and_adapter_updates_through_ray(tiny_paths, monkeypatch):
    """verl's trainer-side path (``LLMServerManager`` → ``HFReplica.init_hybrid`` → load balancer →
    ``LLMServerClient.generate``) and the worker-side adapter finding its server by name."""
    ray = pytest.importorskip("ray")
    from verl.workers.rollout.llm_server import LLMServerManager

    from vlcal_verl.testing.ray_local import private_ray
    from vlcal_verl.verl_ext.cpu_backend.rollout import HFServerAdapter, register_rollout

    register_rollout()
    cfg = _verl_config(tiny_paths[SEED_A])
    with private_ray(num_cpus=2):
        manager = LLMServerManager.create(config=cfg, worker_group=_HybridWorkerGroup(world_size=2))
        assert manager.get_addresses() == ["hf://hf_server_0_0", "hf://hf_server_1_0"]
        client = manager.get_client()
        replicas = manager.get_replicas()
        prompt = list(_tokenizer(tiny_paths[SEED_A])("hello world")["input_ids"])
        sampling = {"temperature": 0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0, "logprobs": True}

        def direct(tag: str) -> list:
            return [
                ray.get(r.server_handle.generate.remote(prompt, dict(sampling), f"{tag}{i}"))
                for i, r in enumerate(replicas)
            ]

        first = asyncio.run(client.generate("a", prompt_ids=prompt, sampling_params=dict(sampling)))
        assert first.stop_reason == "completed" and len(first.log_probs) == len(first.token_ids) <= 4
        before = direct("b")
        # the load balancer routed the client's request to one of the two replicas (greedy: same tokens)
        assert first.token_ids in [o.token_ids for o in before]
        # rank 1 of 2 with tp=1 is replica 1's leader: push all-zero weights to that replica only
        monkeypatch.setenv("RANK", "1")
        adapter = HFServerAdapter(replicas[1].config, replicas[1].model_config, device_mesh=None)
        zeros = ((n, torch.zeros_like(t)) for n, t in _state_dict(tiny_paths[SEED_B]).items())
        asyncio.run(adapter.update_weights(zeros, global_steps=2))
        after = direct("c")
        assert [o.extra_fields["global_steps"] for o in after] == [None, 2]
        assert after[0].token_ids == before[0].token_ids and after[1].token_ids != before[1].token_ids
        for replica in replicas:
            asyncio.run(replica.abort_all_requests())
            asyncio.run(replica.resume_generation())
            asyncio.run(replica.sleep())
            asyncio.run(replica.wake_up())


def _tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _state_dict(path: str) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).state_dict()
