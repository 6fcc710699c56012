"""verl 0.9.1's own training loop on the CPU backend: the production path, end to end, on every commit.

``python -m vlcal_verl.main --recipe recipes/tiny_cpu.yaml`` in a child process — verl's ``run_ppo``, a
private Ray head on 127.0.0.1, TransferQueue, two FSDP ranks on gloo, the HF rollout servers, the reward
loop, ``compute_vce``, the reference, GRPO, TAR, the actor update, checkpoints and weight sync — on a
warm-started tiny Qwen3-VL (so vision spans exist; the small BPE tokenizer, for CI time) and real
easy-vqa images. Assertions read verl's own outputs: its ``file`` logger (one JSON line per step), its
rollout dumps and its checkpoint folder.

Runs go through :func:`vlcal_verl.testing.verl_loop.run_verl` (own Ray temp dir, every process it
started stopped afterwards).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vlcal_verl.testing import recorder
from vlcal_verl.testing.verl_loop import LOOP_TEST_TIMEOUT_S, finite, record_dir, run_verl, steps_of
from vlcal_verl.verl_ext.perception import PERCEPTION_FIELD
from vlcal_verl.verl_ext.trainer import MASKED_LOGP_FIELD
from vlcal_verl.verl_ext.vce_engine import SPAN_FIELD

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(LOOP_TEST_TIMEOUT_S)]


@pytest.fixture(scope="module")
def assets(small_demo_assets):
    """The session's demo data and warm start (tests/conftest.py; the small tokenizer), shared by the runs."""
    return small_demo_assets


STEPS = (1, 2, 3)
"""The main run's GRPO steps: three, so that the two ranks' kept-token counts differ at some step (the
all-reduce test needs that; 2 steps of the small-tokenizer run once kept 222 + 222 both times)."""


@pytest.fixture(scope="module")
def main_run(assets):
    """Three GRPO steps of the default (authors') variant, checkpoint at the last; the recorder on."""
    metrics, ckpt, log = run_verl(
        assets,
        "main",
        [f"trainer.total_training_steps={len(STEPS)}", f"trainer.save_freq={len(STEPS)}"],
        record=True,
    )
    return SimpleNamespace(steps=steps_of(metrics), ckpt=ckpt, log=log, record=record_dir(metrics))


def test_grpo_steps_and_checkpoint(main_run):
    steps = main_run.steps
    assert [s["step"] for s in steps] == list(STEPS)
    for s in steps:
        m = s["data"]
        for key in ("calib/parse_rate", "calib/accuracy", "calib/ece", "vce/span_rate", "vce/time_s"):
            assert finite(m.get(key)), (key, m.get(key))
        # rollout log-probs (HF server) agree with verl's actor recomputation
        assert m["training/rollout_probs_diff_max"] < 2e-3  # measured 4e-4 (fp32 both sides)
        assert finite(m["actor/pg_loss"]) and finite(m["actor/kl_loss"])
    with_spans = [s["data"] for s in steps if s["data"]["vce/span_rate"] > 0]
    assert with_spans, "no step had vision spans: the warm start did not teach the protocol"
    m = with_spans[0]
    for key in ("vce/k_bar/mean", "vce/h_bar/mean", "vce/s/mean", "vce/s_tilde/mean", "tar/weight_mean"):
        assert finite(m.get(key)), (key, m.get(key))
    assert m["vce/k_bar/mean"] > 0  # the masked image changed the policy: images reached the actor
    assert (main_run.ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == str(len(STEPS))
    hf = main_run.ckpt / f"global_step_{len(STEPS)}" / "actor" / "huggingface"
    assert (hf / "config.json").exists() and list(hf.glob("*.safetensors"))


# ---- effect: each VL-Calibration signal changes what verl trains on (read from the recorder) -------------
# The expectations below are recomputed here, in float64, from the raw per-token fields the run recorded
# (old and masked log-probs, spans, c_v, rm_scores): the authors' formulas (vlcal_trainer.yaml and
# variant/authors.yaml), not this package's functions.
W_VIS, TOP_FRACTION, TAR_W = 0.4, 0.2, (0.9, 1.1)


def _by_step(records: list[dict]) -> dict[int, dict]:
    return {int(r["step"]): r for r in records}


def _k3_clamped(old: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """clamp(e^d − d − 1, 0, 10), d = clamp(log p_masked − log p_old, ±20)."""
    d = (masked.double() - old.double()).clamp(-20, 20)
    return (d.exp() - d - 1).clamp(0, 10)


def _span(row: dict, n: int) -> torch.Tensor:
    """Bool [n]: the row's vision-span tokens ([start, end), (−1, −1) = none)."""
    start, end = (int(x) for x in row[SPAN_FIELD].reshape(-1)[:2])
    pos = torch.arange(n)
    return (pos >= start) & (pos < end) & (start >= 0)


def _s_tilde(vce_rows: dict) -> dict:
    """S̃_vis per rollout, the authors' VCE: K_t = p·clamp(log p − log p_masked, ±20) ∈ [0, 10], H_t = −log p,
    S = log(mean_V K + ε) − log(mean_V H + ε), S̃ = sigmoid of S z-scored over the batch (population std)."""
    s = {}
    for key, row in vce_rows.items():
        lo, lm = row["old_log_probs"].double(), row[MASKED_LOGP_FIELD].double()
        span = _span(row, len(lo))
        if span.any():
            k = (lo.exp() * (lo - lm).clamp(-20, 20)).clamp(0, 10)[span].mean()
            s[key] = math.log(float(k) + 1e-8) - math.log(float(-lo[span].mean()) + 1e-8)
    values = torch.tensor(list(s.values()), dtype=torch.float64)
    z = (values - values.mean()) / values.std(unbiased=False)
    return dict(zip(s, torch.sigmoid(z).tolist(), strict=True))


def _c_v(row: dict) -> float | None:
    info = (row["extra_fields"] or {}).get("reward_extra_info", {}) or {}
    return info.get("vision_confidence")


def test_visual_term_reaches_the_rewards_of_the_advantage_step(main_run):
    """Per rollout, verl's advantage step reads rm_scores = the reward before VCE + w_vis·(−(c_v − S̃_vis)²)
    (−w_vis when c_v or the span is missing) on the last response token, and nothing else changed."""
    before = _by_step(recorder.load(main_run.record, "scores_before_vce"))
    vce = _by_step(recorder.load(main_run.record, "vce"))
    adv_in = _by_step(recorder.load(main_run.record, "advantage_in"))
    assert sorted(before) == sorted(vce) == sorted(adv_in) == list(STEPS)
    checked = 0
    for step, m in ((s["step"], s["data"]) for s in main_run.steps):
        rows_before = recorder.by_row(before[step], ["rm_scores"])
        rows_vce = recorder.by_row(
            vce[step], ["old_log_probs", MASKED_LOGP_FIELD, SPAN_FIELD, "extra_fields"]
        )
        rows_after = recorder.by_row(adv_in[step], ["rm_scores"])
        assert set(rows_before) == set(rows_vce) == set(rows_after) and len(rows_after) == 16
        s_tilde = _s_tilde(rows_vce)
        terms = []
        for key, row in rows_after.items():
            old, new = rows_before[key]["rm_scores"].double(), row["rm_scores"].double()
            c_v, s = _c_v(rows_vce[key]), s_tilde.get(key)
            term = -1.0 if c_v is None or s is None else -((c_v - s) ** 2)
            terms.append(term)
            want = old.clone()
            want[-1] += W_VIS * term
            assert torch.allclose(new, want, atol=1e-5), (step, key, new[-1].item(), want[-1].item())
            checked += c_v is not None and s is not None
        assert m["vce/visual_term_mean"] == pytest.approx(sum(terms) / len(terms), abs=1e-5)
    assert checked > 0, "no rollout had both c_v and a vision span: the term was only ever the penalty"


def _grpo(rows: dict) -> dict:
    """verl's GRPO outcome advantage per rollout: (R − mean_group) / (std_group + 1e-6), unbiased std."""
    score = {k: float(r["rm_scores"].double().sum()) for k, r in rows.items()}
    groups: dict[str, list[float]] = {}
    for (uid, _), v in score.items():
        groups.setdefault(uid, []).append(v)
    out = {}
    for key, v in score.items():
        g = torch.tensor(groups[key[0]], dtype=torch.float64)
        mean, std = (g.mean(), g.std()) if len(g) > 1 else (torch.tensor(0.0), torch.tensor(1.0))
        out[key] = float((v - mean) / (std + 1e-6))
    return out


def _tar_weights(old: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """The authors' TAR weights over a whole response: s_t = log(k3_t + ε) − log(−log p_t + ε), z-scored
    with the unbiased std, w_t = w_max − (w_max − w_min)·sigmoid(z_t)."""
    s = torch.log(_k3_clamped(old, masked) + 1e-8) - torch.log(-old.double() + 1e-8)
    std = s.std() if len(s) > 1 else torch.tensor(0.0)
    z = (s - s.mean()) / std if std >= 1e-6 else torch.zeros_like(s)
    return TAR_W[1] - (TAR_W[1] - TAR_W[0]) * torch.sigmoid(z)


def _actor_rows(record: Path) -> dict[int, dict]:
    """What the actor's update read, per step: the mini-batch rows of both ranks (one mini-batch a step
    here), in the order the ranks recorded them."""
    by_rank: dict[int, list[dict]] = {}
    for rec in recorder.load(record, "actor_batch"):
        by_rank.setdefault(int(rec["rank"]), []).append(rec)
    assert sorted(by_rank) == [0, 1] and all(len(v) == len(STEPS) for v in by_rank.values()), (
        "one mini-batch a step"
    )
    fields = ["advantages", "response_mask", PERCEPTION_FIELD]
    return {
        step: {
            "rows": {k: v for r in (0, 1) for k, v in recorder.by_row(by_rank[r][step - 1], fields).items()},
            "records": [by_rank[r][step - 1] for r in (0, 1)],
        }
        for step in STEPS
    }


def test_actor_update_reads_grpo_times_tar_weights(main_run):
    """The advantages the actor's update reads = GRPO's (by hand, from the rewards verl's advantage step
    read) × TAR's weights on vision-span tokens with A < 0, GRPO's elsewhere."""
    adv_in = _by_step(recorder.load(main_run.record, "advantage_in"))
    vce = _by_step(recorder.load(main_run.record, "vce"))
    actor = _actor_rows(main_run.record)
    reweighted = 0
    for step in STEPS:
        grpo = _grpo(recorder.by_row(adv_in[step], ["rm_scores"]))
        rows_vce = recorder.by_row(vce[step], ["old_log_probs", MASKED_LOGP_FIELD, SPAN_FIELD])
        assert set(actor[step]["rows"]) == set(grpo)
        for key, row in actor[step]["rows"].items():
            got = row["advantages"].double()
            old, masked = rows_vce[key]["old_log_probs"], rows_vce[key][MASKED_LOGP_FIELD]
            span = _span(rows_vce[key], len(got))
            a = torch.full_like(got, grpo[key])
            w = _tar_weights(old, masked) if span.any() else torch.ones_like(got)
            apply = span & (a < 0)
            want = torch.where(apply, a * w, a)
            assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (step, key, (got - want).abs().max())
            reweighted += int((apply & ((w - 1).abs() > 1e-3)).sum())
    assert reweighted > 0, "no token was reweighted: the check would pass without TAR"


def test_perception_mask_is_each_responses_top_k3_tokens(main_run):
    """The kept tokens the actor reads are, per response, ⌈20 %⌉ of its tokens, none with a lower clamped k3
    KL (recomputed from the old and masked log-probs the trainer read) than any token left out."""
    vce = _by_step(recorder.load(main_run.record, "vce"))
    actor = _actor_rows(main_run.record)
    for step in STEPS:
        rows_vce = recorder.by_row(vce[step], ["old_log_probs", MASKED_LOGP_FIELD])
        for key, row in actor[step]["rows"].items():
            kept = row[PERCEPTION_FIELD].bool()
            n = len(kept)
            assert int(row["response_mask"].sum()) == n
            k3 = _k3_clamped(rows_vce[key]["old_log_probs"], rows_vce[key][MASKED_LOGP_FIELD])
            assert int(kept.sum()) == (n + 4) // 5, (step, key, n)  # ⌈n/5⌉
            if (~kept).any():
                assert float(k3[kept].min()) >= float(k3[~kept].max()), (step, key)


def _pg_losses(rec: dict) -> torch.Tensor:
    """verl's dual-clip PPO per-token loss, by hand (clip (0.2, 0.3), dual clip 3)."""
    a = rec["advantages"].double()
    ratio = torch.exp((rec["log_prob"].double() - rec["old_log_prob"].double()).clamp(-20, 20))
    lo, hi, c = rec["clip"]["clip_ratio_low"], rec["clip"]["clip_ratio_high"], rec["clip"]["clip_ratio_c"]
    assert (lo, hi, c) == (0.2, 0.3, 3.0)
    clipped = torch.maximum(-a * ratio, -a * ratio.clamp(1 - lo, 1 + hi))
    return torch.where(a < 0, torch.minimum(-a * c, clipped), clipped)


def _loss_calls_by_step(record: Path) -> dict[int, list[dict]]:
    """The ``policy_loss`` records of each step. A rank's worker records its step's ``actor_batch`` before
    that step's loss calls, under one process-wide counter (``<kind>-<pid>-<n>.pt``): a call belongs to the
    step of the last ``actor_batch`` its process wrote before it (the kept counts of two steps can agree)."""

    def pid_n(path: Path) -> tuple[int, int]:
        pid, n = path.stem.split("-")[-2:]
        return int(pid), int(n)

    starts: dict[int, list[int]] = {}
    for path in record.glob("actor_batch-*.pt"):
        pid, n = pid_n(path)
        starts.setdefault(pid, []).append(n)
    out: dict[int, list[dict]] = {}
    for path in sorted(record.glob("policy_loss-*.pt")):
        pid, n = pid_n(path)
        out.setdefault(sum(s < n for s in starts[pid]), []).append(torch.load(path, weights_only=False))
    return out


def test_perception_pg_loss_by_hand_with_the_global_kept_count(main_run):
    """Each micro-batch's policy-gradient loss = Σ_kept loss_t / (kept tokens of the whole mini-batch on
    both ranks) · dp_size — the two ranks hold different kept counts — and differs from the loss over
    every response token."""
    actor = _actor_rows(main_run.record)
    losses = _loss_calls_by_step(main_run.record)
    assert sorted(losses) == list(STEPS)
    uneven = 0
    for step in STEPS:
        local = [float(rec[PERCEPTION_FIELD].sum()) if isinstance(rec[PERCEPTION_FIELD], torch.Tensor)
                 else float(sum(r.sum() for r in rec[PERCEPTION_FIELD])) for rec in actor[step]["records"]]  # fmt: skip
        uneven += local[0] != local[1]  # measured: 112 + 110 at step 1; 222 + 222 twice in another run
        for rec in actor[step]["records"]:
            assert rec["kept_global"] == sum(local)
        calls = losses[step]
        assert sorted({int(c["rank"]) for c in calls}) == [0, 1]
        assert all(c["kept_tokens"] == sum(local) for c in calls)
        filtered = unfiltered = 0.0
        for c in calls:
            mask = c["response_mask"].bool()
            kept = mask & c["kept"].bool()
            pg, dp = _pg_losses(c), c["batch_info"]["dp_size"]
            assert dp == 2 and c["batch_info"]["batch_num_tokens"] > sum(local)
            want = float((pg * kept).sum()) / sum(local) * dp
            assert float(c["loss"]) == pytest.approx(want, rel=1e-4, abs=1e-7)
            filtered += want
            unfiltered += float((pg * mask).sum()) / c["batch_info"]["batch_num_tokens"] * dp
        assert sum(
            float(c["kept"].bool().logical_and(c["response_mask"].bool()).sum()) for c in calls
        ) == sum(local)  # every kept token of the mini-batch went through the loss once
        assert abs(filtered - unfiltered) > 1e-4 * max(abs(unfiltered), 1e-3), (filtered, unfiltered)
    assert uneven, "both ranks kept as many tokens at every step: the all-reduce is not exercised"


@pytest.fixture(scope="module")
def two_image_data(small_demo_assets):
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
    path = small_demo_assets / "two_images.parquet"
    write_parquet(rows, path)
    return path


def test_two_images_equal_lengths_micro_batches_and_padded_layout(small_demo_assets, two_image_data):
    """The layouts that crashed or were never run: two images per sample; one prompt × n rollouts all cut
    at the response limit (every sample on a rank the same length); several micro-batches per rank;
    verl's padded (``use_remove_padding=false``) layout — with this project's exact variant (full-vocabulary
    KL on a truncated masked forward, no perception filter) and VCE as its own ``compute_vce`` call on the
    actor mesh (``vlcal.vce.fused=false``) instead of inside verl's old-log-prob pass — under verl's
    rollout-correction bypass, which skips that pass and trains on the rollout's log-probs (so H_t is
    −log p: the distribution entropy would come from the skipped pass; ``--check`` refuses that pairing).
    The small tokenizer: this run's subject is the layout, not the tokenizer."""
    overrides = [
        "variant=exact",
        "vlcal.vce.fused=false",
        "algorithm.rollout_correction.bypass_mode=true",  # verl skips the old-log-prob pass: H_t = −log p
        "vlcal.vce.entropy=nll",
        "vlcal.tar.entropy=nll",
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
    metrics, _, _ = run_verl(small_demo_assets, "variants", overrides)
    (step,) = steps_of(metrics)
    m = step["data"]
    assert m["response_length/min"] == m["response_length/max"] == 24  # equal lengths on every rank
    assert m["prompt_length/min"] == m["prompt_length/max"]  # one prompt, shared by the group
    # the full-vocabulary KL came back from the separate compute_vce (the fused path times its spans apart)
    assert m["vce/span_rate"] > 0 and m["vce/k_bar/mean"] > 0 and "vce/span_time_s" not in m
    assert finite(m["actor/pg_loss"]) and finite(m["actor/grad_norm"])
    assert "actor/perception_token_fraction" not in m and "vce/perception_token_fraction" not in m
    # bypass: verl compares rollout and recomputed log-probs only when it recomputes them (main run: it does)
    assert not any(k.startswith("training/rollout_probs_diff") for k in m), sorted(m)


def test_images_lost_by_a_custom_dataset_stop_the_run_at_step_1(small_demo_assets):
    """The image guard's failure path through verl: a ``data.custom_cls`` dataset whose messages lose their
    images (vlcal_verl.testing.datasets) would train text-only; the trainer stops before step 1's update."""
    overrides = [
        "data.custom_cls.path=pkg://vlcal_verl.testing.datasets",
        "data.custom_cls.name=ImageDroppingDataset",
        "data.train_batch_size=2",
        "data.max_response_length=16",
        "actor_rollout_ref.rollout.n=2",
        "actor_rollout_ref.actor.ppo_mini_batch_size=2",
        "trainer.total_training_steps=1",
        "trainer.save_freq=-1",
    ]
    metrics, ckpt, log = run_verl(small_demo_assets, "dropped_images", overrides, expect_ok=False)
    assert "Using dataset class: ImageDroppingDataset" in log  # verl loaded the custom class
    assert "the training data has images (images) but none reached the trainer" in log, log[-4000:]
    assert not metrics.exists() or not steps_of(metrics)  # no step was logged: nothing trained text-only
    assert not ckpt.exists() or not any(ckpt.iterdir())


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
