"""The client through verl 0.9.1's own machinery: loaded by ``get_custom_reward_fn`` from
``pkg://reward_server.client`` (async → awaited), run by the ``naive`` reward manager on a real
tokenized rollout, against the real server — the dict verl records equals in-process compute_score."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from reward_server import client
from vlcal_verl import rewards

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]

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


def run_single(reward_kwargs: dict) -> dict:
    """verl's naive reward manager, with the client loaded by verl from its config, on one rollout."""
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
                    "reward_kwargs": reward_kwargs,
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
        return loop.run_until_complete(manager.run_single(data))
    finally:
        asyncio.set_event_loop(None)
        loop.close()


def test_verl_loads_and_awaits_the_client(server):
    out = run_single({"server_url": server.url, "timeout_s": 30.0})
    want = rewards.compute_score("clevr", RESPONSE, "2", {"index": 7})
    assert out["reward_score"] == pytest.approx(want["score"])
    assert out["reward_extra_info"] == pytest.approx({**want, **dict.fromkeys(client.CLIENT_METRIC_KEYS, 0)})
    assert want["accuracy"] == 1.0 and want["format"] == 1.0


def test_verl_step_fails_in_one_line_when_the_server_is_gone():
    """What verl's reward loop awaits raises — it does not score 0 — once the retry budget is spent."""
    with socket.socket() as s:  # a port nothing listens on once this block closes it
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(client.RewardServerError) as err:
        run_single({"server_url": url, "max_retries": 2, "backoff_s": 0.05, "backoff_max_s": 0.1})
    assert "\n" not in str(err.value)
    assert str(err.value).startswith(f"reward server {url}/v1/score failed: gave up after 3 attempts in ")


def test_trainer_passes_the_client_budget_through():
    """``vlcal.reward_server_url`` wires the client; its retry options given under reward_kwargs are kept."""
    from hydra import compose, initialize_config_dir

    from vlcal_verl.main import CONFIG_DIR, prepare, verl_config_dir

    search = f"hydra.searchpath=[file://{CONFIG_DIR},file://{verl_config_dir()}]"
    overrides = [
        search,
        "vlcal.reward_server_url=http://rm:8000",
        "+reward.custom_reward_function.reward_kwargs.max_retries=3",
        "+reward.custom_reward_function.reward_kwargs.item_retries=0",
    ]
    with initialize_config_dir(config_dir=str(REPO / "recipes"), version_base=None):
        cfg = compose(config_name="qwen3_vl_4b", overrides=overrides)
    prepare(cfg)
    opts = client.ClientOptions.from_kwargs(dict(cfg.reward.custom_reward_function.reward_kwargs))
    assert (opts.server_url, opts.max_retries, opts.item_retries) == ("http://rm:8000", 3, 0)
    assert opts.timeout_s == client.ClientOptions.timeout_s  # the rest keep the documented defaults
