"""The client through verl 0.9.1's own machinery: loaded by ``get_custom_reward_fn`` from
``pkg://reward_server.client`` (async → awaited), run by the ``naive`` reward manager on a real
tokenized rollout, against the real server — the dict verl records equals in-process compute_score."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from vlcal_verl import rewards

pytestmark = pytest.mark.integration

RESPONSE = (
    "<think><vision>Two cats on a sofa.</vision><reasoning>Count them: two.</reasoning></think>\n"
    "\\boxed{2}\n<analysis>Clear photo.</analysis>\n<confidence><vision_confidence>9</vision_confidence>"
    "<reasoning_confidence>8</reasoning_confidence></confidence>"
)


def rollout(tokenizer, prompt: str, response: str, pad_to: int):
    """A one-sample DataProto shaped like verl's rollout output (right-padded response)."""
    from verl import DataProto

    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    pad = tokenizer.pad_token_id or 0
    responses = torch.tensor([r + [pad] * (pad_to - len(r))])
    mask = torch.tensor([[1] * (len(p) + len(r)) + [0] * (pad_to - len(r))])
    return DataProto.from_dict(
        tensors={"prompts": torch.tensor([p]), "responses": responses, "attention_mask": mask},
        non_tensors={
            "data_source": np.array(["clevr"], dtype=object),
            "reward_model": np.array([{"ground_truth": "2"}], dtype=object),
            "extra_info": np.array([{"index": 7, "split": "train"}], dtype=object),
        },
    )


def test_verl_loads_and_awaits_the_client(server):
    from omegaconf import OmegaConf
    from verl.experimental.reward_loop.reward_manager.naive import NaiveRewardManager
    from verl.trainer.ppo.reward import get_custom_reward_fn

    from vlcal_verl.testing.tokenizer import qwen_tokenizer

    config = OmegaConf.create(
        {
            "reward": {
                "custom_reward_function": {
                    "path": "pkg://reward_server.client",
                    "name": "compute_score",
                    "reward_kwargs": {"server_url": server.url, "timeout_s": 30.0},
                }
            }
        }
    )
    fn = get_custom_reward_fn(config)
    tokenizer = qwen_tokenizer()
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        manager = NaiveRewardManager(config, tokenizer, fn)
        assert manager.is_async_reward_score
        data = rollout(tokenizer, "<|im_start|>user\nHow many cats?<|im_end|>\n", RESPONSE, pad_to=96)
        out = loop.run_until_complete(manager.run_single(data))
    finally:
        asyncio.set_event_loop(None)
        loop.close()
    want = rewards.compute_score("clevr", RESPONSE, "2", {"index": 7})
    assert out["reward_score"] == pytest.approx(want["score"])
    assert out["reward_extra_info"] == pytest.approx(want)
    assert want["accuracy"] == 1.0 and want["format"] == 1.0
