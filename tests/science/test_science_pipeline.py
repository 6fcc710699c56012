"""The science pipeline's flow with its expensive phases replaced by recorders: one warm start, both arms
per seed from it through verl's command line, one evaluation per model, resume skips what is done."""

from __future__ import annotations

from pathlib import Path

import pytest

import vlcal_verl.science.pipeline as pipeline
import vlcal_verl.science.report as report

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "tiny_science.yaml"


@pytest.fixture
def fake(monkeypatch):
    """Record the phases; the GRPO stand-in leaves what verl leaves (checkpoint marker + HF folder)."""
    log: dict[str, list] = {"assets": [], "grpo": [], "eval": [], "report": []}

    def prepare_assets(dc, out, timings):
        log["assets"].append(out)
        (out / "warm_start").mkdir(parents=True, exist_ok=True)
        return out / "warm_start", out / "data"

    def run_grpo(cmd, run_dir):
        log["grpo"].append(cmd)
        ckpt = Path(next(a.split("=", 1)[1] for a in cmd if a.startswith("trainer.default_local_dir=")))
        steps = int(next(a.split("=", 1)[1] for a in cmd if a.startswith("trainer.total_training_steps=")))
        (ckpt / f"global_step_{steps}" / "actor" / "huggingface").mkdir(parents=True)
        (ckpt / f"global_step_{steps}" / "actor" / "huggingface" / "config.json").write_text("{}")
        (ckpt / "latest_checkpointed_iteration.txt").write_text(str(steps))

    def evaluate(dc, config, model, data_dir, out, timings, key):
        log["eval"].append((Path(model), out.name))
        out.mkdir(parents=True)
        (out / "metrics.json").write_text("{}")
        (out / "generations.jsonl").write_text("")

    monkeypatch.setattr(pipeline, "prepare_assets", prepare_assets)
    monkeypatch.setattr(pipeline, "run_grpo", run_grpo)
    monkeypatch.setattr(pipeline, "evaluate", evaluate)
    monkeypatch.setattr(report, "write_report", lambda out, sc, seeds, t: log["report"].append(seeds) or {})
    return log


def test_one_warm_start_two_arms_per_seed_then_resume_skips_done_work(fake, tmp_path):
    out = tmp_path / "run"
    pipeline.run_science(RECIPE, out, ["trainer.total_training_steps=2"], seeds=2)
    assert fake["assets"] == [out]  # one warm start
    assert len(fake["grpo"]) == 4 and fake["report"] == [[0, 1]]
    for cmd in fake["grpo"]:
        assert cmd[1:5] == ["-m", "vlcal_verl.main", "--recipe", str(RECIPE)]
        assert f"demo.dir={out}" in cmd  # the same data and warm_start/ for every run
    names = [
        next(a for a in c if a.startswith("trainer.experiment_name=")).split("=")[1] for c in fake["grpo"]
    ]
    assert names == [
        "science-full-seed0",
        "science-baseline-seed0",
        "science-full-seed1",
        "science-baseline-seed1",
    ]
    assert ["ablation=decoupled" in c for c in fake["grpo"]] == [False, True, False, True]
    assert [("data.seed=1" in c) for c in fake["grpo"]] == [False, False, True, True]
    evaluated = [name for _, name in fake["eval"]]
    assert evaluated == ["warm_start", "full-seed0", "baseline-seed0", "full-seed1", "baseline-seed1"]
    assert fake["eval"][0][0] == out / "warm_start"
    assert fake["eval"][2][0] == out / "rl/baseline-seed0/verl/global_step_2/actor/huggingface"

    pipeline.run_science(RECIPE, out, ["trainer.total_training_steps=2"], seeds=2, resume=True)
    assert len(fake["grpo"]) == 4 and len(fake["eval"]) == 5  # nothing redone
    assert len(fake["report"]) == 2
    with pytest.raises(ValueError, match="other settings"):
        pipeline.run_science(RECIPE, out, ["trainer.total_training_steps=3"], seeds=2, resume=True)
