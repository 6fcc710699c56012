"""InternVL through verl 0.9.1's own loop on the CPU backend (the paper's cross-architecture run).

A warm-started tiny InternVL (transformers' InternVL classes, 28-px tiles of 4 tokens, crops + thumbnail;
the small BPE tokenizer with InternVL's image tokens appended, for CI time) on real easy-vqa images,
through the same ``python -m vlcal_verl.main`` as the Qwen-VL loop test. verl 0.9.1 alone builds no
processor for it; this package's model config (``actor_rollout_ref.model._target_``) supplies
``InternVLProcessor``. Half the prompts have no image, and micro-batches hold one sequence, so FSDP ranks
run image and image-less micro-batches side by side (the dummy vision forward's case).
"""

from __future__ import annotations

import pytest

from vlcal_verl.testing.verl_loop import LOOP_TEST_TIMEOUT_S, finite, run_verl, steps_of

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(LOOP_TEST_TIMEOUT_S)]

INTERNVL = ["demo.model_family=internvl", "data.mm_processor_kwargs=null"]  # tiles, not Qwen's pixel budget


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """32 train prompts and a warm start of the tiny InternVL on the small tokenizer (it learns the response
    protocol, so responses have vision spans)."""
    from vlcal_verl.demo.config import DemoConfig
    from vlcal_verl.demo.pipeline import prepare_assets

    root = tmp_path_factory.mktemp("cpu_loop_internvl")
    cfg = DemoConfig(
        dir=str(root),
        model_family="internvl",
        tokenizer="small",
        train_size=32,
        eval_size=4,
        warm_start_steps=90,
    )
    prepare_assets(cfg, root, {})
    return root


@pytest.fixture(scope="module")
def mixed_data(assets):
    """Eight easy-vqa questions, every other one without its image (read in order: each step mixes)."""
    from PIL import Image

    from vlcal_verl.data.easy_vqa import load_easy_vqa
    from vlcal_verl.data.schema import make_row, write_parquet

    rows = []
    for i, it in enumerate(load_easy_vqa("train", limit=8, seed=7)):
        images = [it.image.resize((128, 128), Image.NEAREST)] if i % 2 == 0 else []
        rows.append(
            make_row(
                question=it.question, answer=it.answer, images=images, data_source="easy-vqa",
                answer_kind=it.kind, index=i, uid=it.uid,
            )
        )  # fmt: skip
    path = assets / "mixed.parquet"
    write_parquet(rows, path)
    return path


def test_two_grpo_steps_with_images_reaching_rollout_and_actor(assets, mixed_data):
    # tokens per micro-batch: prompt + response fits once, never twice (small tokenizer: these prompts are
    # 255..283 tokens, 22 of them an image's; a response at most data.max_response_length = 96)
    one_sequence, max_response = 384, 96
    overrides = [
        *INTERNVL,
        f"data.train_files={mixed_data}",
        "data.shuffle=false",
        "data.train_batch_size=2",
        *(f"actor_rollout_ref.{k}={one_sequence}" for k in (
            "actor.ppo_max_token_len_per_gpu", "rollout.log_prob_max_token_len_per_gpu",
            "ref.log_prob_max_token_len_per_gpu",
        )),
        "trainer.total_training_steps=2",
        "trainer.save_freq=2",
    ]  # fmt: skip
    metrics, ckpt, log = run_verl(assets, "main", overrides)
    steps = steps_of(metrics)
    assert [s["step"] for s in steps] == [1, 2]
    assert "Failed to create processor" not in log  # verl's warning before it drops the images
    for s in steps:
        m = s["data"]
        assert m["prompt_length/min"] < m["prompt_length/max"]  # prompts with and without an image
        assert m["prompt_length/max"] + max_response <= one_sequence < 2 * m["prompt_length/min"]
        # the HF rollout saw the same tiles as the actor: its log-probs are verl's recomputation
        # (measured 1.6e-6; 0.98 when the rollout got no image and the actor did)
        assert m["training/rollout_probs_diff_max"] < 2e-3
        assert finite(m["actor/pg_loss"]) and finite(m["actor/grad_norm"])
    with_spans = [s["data"] for s in steps if s["data"]["vce/span_rate"] > 0]
    assert with_spans, "no step had vision spans: the warm start did not teach the protocol"
    # the masked tiles changed the policy: images reached the actor's forward (and the trainer's
    # first-step guard found multi_modal_inputs, or the run would have stopped)
    assert all(m["vce/k_bar/mean"] > 0 for m in with_spans)
    assert any(s["data"]["tar/reweighted_fraction"] > 0 for s in steps)
    hf = ckpt / "global_step_2" / "actor" / "huggingface"
    assert (hf / "config.json").exists() and list(hf.glob("*.safetensors"))
    from transformers import AutoProcessor, InternVLProcessor

    assert type(AutoProcessor.from_pretrained(hf)) is InternVLProcessor  # the processor travels with it
