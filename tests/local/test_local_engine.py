"""The local engine end to end on CPU with tiny settings: a 2-step GRPO run, exact resume, verl calls.

Rewards are the real ones plus, in these tests, a deterministic bonus from the response text (a random
model writes no protocol, so the real rewards alone would be equal and the advantages zero): that way
the policy loss is non-zero and the resume check compares a real gradient step.
"""

from __future__ import annotations

import json
import math
import zlib

import pytest
import torch

pytestmark = pytest.mark.slow

TINY = [
    "local.train_size=8",
    "local.eval_size=0",
    "local.evaluate=false",
    "local.tensorboard=false",
    "local.warm_start_steps=1",
    "local.warm_start_batch_size=2",
    "local.prompts_per_step=2",
    "local.n_rollouts=2",
    "local.max_new_tokens=12",
    "local.kl_coef=0.001",
    "local.checkpoint_every=1",
]


def _demo_data():
    from vlcal_verl.data.easy_vqa import load_easy_vqa
    from vlcal_verl.local.data import DemoData

    return DemoData(train=load_easy_vqa("train", limit=8, seed=0), eval=[], unanswerable=[])


def _bonus_scores(monkeypatch):
    import vlcal_verl.rewards as rewards

    real = rewards.score_many

    def score_many(items, *args, **kwargs):
        items = list(items)
        out = real(items, *args, **kwargs)
        for (text, _, _), s in zip(items, out, strict=True):
            s["score"] = s["score"] + (zlib.crc32(text.encode()) % 5) / 4.0
        return out

    monkeypatch.setattr(rewards, "score_many", score_many)


def _run(tmp_path, name, overrides, resume=False):
    from vlcal_verl.local.config import load_train_config
    from vlcal_verl.local.engine import LocalEngine

    cfg = load_train_config(None, TINY + overrides)
    engine = LocalEngine(cfg, tmp_path / name, resume=resume, data=_demo_data())
    engine.run()
    rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return engine, [r for r in rows if r["phase"] == "rl"]


@pytest.fixture(scope="module")
def calls():
    return {"grpo": 0, "policy_loss": 0, "kl_penalty": 0}


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory, calls):
    from verl.trainer.ppo import core_algos

    mp = pytest.MonkeyPatch()
    _bonus_scores(mp)
    grpo, loss, kl = (
        core_algos.compute_grpo_outcome_advantage,
        core_algos.POLICY_LOSS_REGISTRY["vanilla"],
        core_algos.kl_penalty,
    )

    def grpo_spy(*a, **k):
        calls["grpo"] += 1
        return grpo(*a, **k)

    def loss_spy(*a, **k):
        calls["policy_loss"] += 1
        return loss(*a, **k)

    def kl_spy(*a, **k):
        calls["kl_penalty"] += 1
        return kl(*a, **k)

    mp.setattr(core_algos, "compute_grpo_outcome_advantage", grpo_spy)
    mp.setitem(core_algos.POLICY_LOSS_REGISTRY, "vanilla", loss_spy)
    mp.setattr(core_algos, "kl_penalty", kl_spy)
    tmp = tmp_path_factory.mktemp("local")
    try:
        engine, rows = _run(tmp, "full", ["local.rl_steps=2"])
    finally:
        mp.undo()
    return tmp, engine, rows


def test_two_step_run_logs_and_checkpoints(two_step_run):
    tmp, _engine, rows = two_step_run
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert math.isfinite(r["actor/loss"]) and r["adv/nonzero_frac"] > 0
        assert {"reward/mean", "reward/parse_ok", "actor/pg_loss", "actor/kl_loss"} <= set(r)
    ckpts = tmp / "full" / "checkpoints"
    assert (ckpts / "step_1.pt").exists() and (ckpts / "step_2.pt").exists()
    assert (ckpts / "latest.txt").read_text().strip() == "step_2.pt"


def test_engine_calls_verl_core_algos(two_step_run, calls):
    assert calls["grpo"] == 2, "GRPO advantages must come from verl core_algos"
    assert calls["policy_loss"] == 2, "the PPO-clip loss must come from verl's policy-loss registry"
    assert calls["kl_penalty"] == 2, "the KL loss must use verl core_algos.kl_penalty"


def test_resume_after_step_one_reproduces_step_two_exactly(two_step_run, tmp_path, monkeypatch):
    _, full_engine, full_rows = two_step_run
    _bonus_scores(monkeypatch)
    _run(tmp_path, "cut", ["local.rl_steps=1"])
    resumed_engine, rows = _run(tmp_path, "cut", ["local.rl_steps=2"], resume=True)
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[1]["actor/loss"] != 0.0
    assert rows[1] == full_rows[1], "step 2 metrics (loss, rewards, advantages) must match bit for bit"
    full_sd, resumed_sd = full_engine.model.state_dict(), resumed_engine.model.state_dict()
    for k, v in full_sd.items():
        assert torch.equal(v, resumed_sd[k]), k
