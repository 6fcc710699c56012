"""verl 0.9.1's own training loop on the CPU backend: the production path, end to end, on every commit.

``python -m vlcal_verl.main --recipe recipes/tiny_cpu.yaml`` in a child process — verl's ``run_ppo``, a
private Ray head on 127.0.0.1, TransferQueue, two FSDP ranks on gloo, the HF rollout servers, the reward
loop, ``compute_vce``, the reference, GRPO, TAR, the actor update, checkpoints and weight sync — on a
warm-started tiny Qwen3-VL (so vision spans exist) and real easy-vqa images. Assertions read verl's own
outputs: its ``file`` logger (one JSON line per step), its rollout dumps and its checkpoint folder.

Runs go through :func:`vlcal_verl.testing.verl_loop.run_verl` (own Ray temp dir, every process it
started stopped afterwards).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from vlcal_verl.commands.train import DEFAULT_RECIPE
from vlcal_verl.testing.verl_loop import finite, run_verl, steps_of

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def assets(qwen_demo_assets):
    """The session's demo data and warm start (tests/conftest.py), shared by the runs below."""
    return qwen_demo_assets


def test_two_grpo_steps_checkpoint_and_resume(assets):
    overrides = ["trainer.total_training_steps=2", "trainer.save_freq=2"]
    metrics, ckpt, _ = run_verl(assets, "main", overrides)
    steps = steps_of(metrics)
    assert [s["step"] for s in steps] == [1, 2]
    for s in steps:
        m = s["data"]
        for key in ("calib/parse_rate", "calib/accuracy", "calib/ece", "vce/span_rate", "vce/time_s"):
            assert finite(m.get(key)), (key, m.get(key))
        # rollout log-probs (HF server) agree with verl's actor recomputation
        assert m["training/rollout_probs_diff_max"] < 2e-3  # measured 4e-4 (fp32 both sides)
    with_spans = [s["data"] for s in steps if s["data"]["vce/span_rate"] > 0]
    assert with_spans, "no step had vision spans: the warm start did not teach the protocol"
    m = with_spans[0]
    for key in ("vce/k_bar/mean", "vce/h_bar/mean", "vce/s/mean", "vce/s_tilde/mean", "tar/weight_mean"):
        assert finite(m.get(key)), (key, m.get(key))
    assert m["vce/k_bar/mean"] > 0  # the masked image changed the policy: images reached the actor
    assert 0.9 - 1e-6 <= m["tar/weight_min"] <= m["tar/weight_max"] <= 1.1 + 1e-6
    assert any(s["data"]["tar/reweighted_fraction"] > 0 for s in steps)
    # the default is the authors' run: the perception filter keeps ⌈20 %⌉ of each response's tokens for
    # the policy-gradient loss inside verl's actor loss (1/n above 0.2 at most, responses ≤ 96 tokens)
    for s in steps:
        frac = s["data"]["actor/perception_token_fraction"]
        assert 0.2 - 1e-6 <= frac <= 0.2 + 0.25, frac  # ⌈0.2·n⌉/n: 0.25 for a 4-token response
        assert s["data"]["vce/perception_token_fraction"] == pytest.approx(frac, abs=0.05)
        assert finite(s["data"]["actor/pg_loss"]) and finite(s["data"]["actor/kl_loss"])
    assert any(s["data"]["critic/advantages/max"] > s["data"]["critic/advantages/min"] for s in steps)
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    hf = ckpt / "global_step_2" / "actor" / "huggingface"
    assert (hf / "config.json").exists() and list(hf.glob("*.safetensors"))

    # resume: verl continues at step 3 with the data order of an uninterrupted run
    metrics3, _, log = run_verl(assets, "main", ["trainer.total_training_steps=3", "trainer.save_freq=3"])
    assert [s["step"] for s in steps_of(metrics3)] == [3]
    assert "global_step_2" in log  # it loaded the checkpoint
    assert step_questions(assets / "main" / "dump" / "3.jsonl", assets) == expected_batch(assets, step=3)


def expected_batch(root: Path, step: int) -> Counter:
    """(question, answer) pairs of GRPO step ``step`` from verl's own seeded sampler (×n rollouts)."""
    from omegaconf import OmegaConf
    from verl.trainer.ppo.utils import create_rl_sampler

    from vlcal_verl.data.schema import read_parquet
    from vlcal_verl.main import compose_recipe

    cfg = compose_recipe(DEFAULT_RECIPE, [f"demo.dir={root}"])
    rows = read_parquet(root / "data" / "train.parquet")
    order = list(
        create_rl_sampler(OmegaConf.create({"shuffle": True, "seed": cfg.data.seed}), range(len(rows)))
    )
    b, n = int(cfg.data.train_batch_size), int(cfg.actor_rollout_ref.rollout.n)
    batch = order[(step - 1) * b : step * b]
    return Counter(
        {(rows[i]["extra_info"]["question"], rows[i]["reward_model"]["ground_truth"]): n for i in batch}
    )


def step_questions(dump: Path, root: Path) -> Counter:
    """(question, answer) pairs of verl's rollout dump of one step (prompts decoded by verl)."""
    from vlcal_verl.data.schema import read_parquet

    questions = {r["extra_info"]["question"] for r in read_parquet(root / "data" / "train.parquet")}
    out: Counter = Counter()
    for line in dump.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            found = [q for q in questions if f"\n{q}\n" in r["input"]]
            assert found, f"no training question in the dumped prompt {r['input'][:200]!r}"
            out[(max(found, key=len), r["gts"])] += 1
    return out


@pytest.fixture(scope="module")
def two_image_data(assets):
    """Every sample shows two images (the picture and its mirror image)."""
    from PIL import Image

    from vlcal_verl.data.easy_vqa import load_easy_vqa
    from vlcal_verl.data.schema import make_row, write_parquet

    items = load_easy_vqa("train", limit=8, seed=5)
    rows = []
    for i, it in enumerate(items):
        im = it.image.resize((128, 128), Image.NEAREST)
        rows.append(
            make_row(
                question=it.question, answer=it.answer, images=[im, im.transpose(Image.FLIP_LEFT_RIGHT)],
                data_source="easy-vqa", answer_kind=it.kind, index=i, uid=it.uid,
            )
        )  # fmt: skip
    path = assets / "two_images.parquet"
    write_parquet(rows, path)
    return path


def test_two_images_equal_lengths_micro_batches_and_padded_layout(assets, two_image_data):
    """The layouts that crashed or were never run: two images per sample; one prompt × n rollouts all cut
    at the response limit (every sample on a rank the same length); several micro-batches per rank;
    verl's padded (``use_remove_padding=false``) layout — with this project's exact variant (full-vocabulary
    KL on a truncated masked forward, no perception filter)."""
    overrides = [
        "variant=exact",
        f"data.train_files={two_image_data}",
        "data.train_batch_size=1",
        "data.max_response_length=24",
        "actor_rollout_ref.rollout.n=4",
        "actor_rollout_ref.actor.ppo_mini_batch_size=1",
        "actor_rollout_ref.model.use_remove_padding=false",
        "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=600",
        "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=600",
        "actor_rollout_ref.ref.log_prob_max_token_len_per_gpu=600",
        "trainer.total_training_steps=1",
        "trainer.save_freq=-1",
    ]
    metrics, _, _ = run_verl(assets, "variants", overrides)
    (step,) = steps_of(metrics)
    m = step["data"]
    assert m["response_length/min"] == m["response_length/max"] == 24  # equal lengths on every rank
    assert m["prompt_length/min"] == m["prompt_length/max"]  # one prompt, shared by the group
    assert m["vce/span_rate"] > 0 and m["vce/k_bar/mean"] > 0
    assert finite(m["actor/pg_loss"]) and finite(m["actor/grad_norm"])
    assert "actor/perception_token_fraction" not in m and "vce/perception_token_fraction" not in m


def test_export_checkpoint_and_eval_it(assets, tmp_path):
    """``vlcal export`` of the checkpoint verl's loop wrote (verl's own model merger) → an HF folder with
    the weights verl saved as ``hf_model`` beside its shards, and the processor, which ``vlcal eval`` reads."""
    from safetensors.torch import load_file

    from vlcal_verl.cli import main

    ckpt = assets / "main" / "ckpt"
    if not (ckpt / "latest_checkpointed_iteration.txt").exists():  # run alone (-k export): a 1-step run
        _, ckpt, _ = run_verl(assets, "export", ["trainer.total_training_steps=1", "trainer.save_freq=1"])
    step = (ckpt / "latest_checkpointed_iteration.txt").read_text().strip()
    out = tmp_path / "hf"
    assert main(["export", str(ckpt), str(out)]) == 0

    def weights(folder: Path) -> dict:
        return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}

    exported, verl_hf = weights(out), weights(ckpt / f"global_step_{step}" / "actor" / "huggingface")
    assert exported and set(exported) == set(verl_hf)
    for key, value in exported.items():  # verl's merger writes bfloat16
        assert (value == verl_hf[key].to(value.dtype)).all(), key
    assert (out / "chat_template.jinja").is_file() and (out / "tokenizer_config.json").is_file()
    rep = tmp_path / "rep"
    rc = main(
        ["eval", "--model", str(out), "--bench", "easy-vqa", "--limit", "2", "--max-new-tokens", "8",
         "--n-boot", "0", "--out", str(rep)]
    )  # fmt: skip
    assert rc == 0 and json.loads((rep / "metrics.json").read_text())["overall"]["n"] == 2
