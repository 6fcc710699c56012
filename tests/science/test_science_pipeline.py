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
    log: dict[str, list] = {"assets": [], "grpo": [], "eval": [], "report": [], "benches": []}

    def prepare_assets(dc, out, timings):
        log["eval_size"] = dc.eval_size
        from vlcal_verl.data.easy_vqa import load_easy_vqa, to_verl_rows
        from vlcal_verl.data.schema import write_parquet

        log["assets"].append(out)
        (out / "warm_start").mkdir(parents=True, exist_ok=True)
        (out / "data").mkdir(parents=True, exist_ok=True)
        if not (out / "data" / "train.parquet").exists():
            write_parquet(
                to_verl_rows(load_easy_vqa("train", limit=3, seed=0)), out / "data" / "train.parquet"
            )
        return out / "warm_start", out / "data"

    def run_grpo(cmd, run_dir):
        log["grpo"].append(cmd)
        ckpt = Path(next(a.split("=", 1)[1] for a in cmd if a.startswith("trainer.default_local_dir=")))
        steps = int(next(a.split("=", 1)[1] for a in cmd if a.startswith("trainer.total_training_steps=")))
        (ckpt / f"global_step_{steps}" / "actor" / "huggingface").mkdir(parents=True)
        (ckpt / f"global_step_{steps}" / "actor" / "huggingface" / "config.json").write_text("{}")
        (ckpt / "latest_checkpointed_iteration.txt").write_text(str(steps))

    def run_vlcal_eval(model, data_dir, benches, out, *, max_new_tokens, cfg, protocol):
        log["eval"].append((Path(model), out.name, protocol))
        log["benches"].append(benches)
        assert max_new_tokens == 96
        out.mkdir(parents=True)
        (out / "metrics.json").write_text("{}")
        (out / "generations.jsonl").write_text("")

    monkeypatch.setattr(pipeline, "prepare_assets", prepare_assets)
    monkeypatch.setattr(pipeline, "run_grpo", run_grpo)
    monkeypatch.setattr(pipeline, "run_vlcal_eval", run_vlcal_eval)
    monkeypatch.setattr(report, "write_report", lambda out, sc, seeds, t: log["report"].append(seeds) or {})
    return log


def test_one_warm_start_two_arms_per_seed_then_resume_skips_done_work(fake, tmp_path):
    out = tmp_path / "run"
    pipeline.run_science(
        RECIPE, out, ["trainer.total_training_steps=2", "science.baseline=decoupled"], seeds=2
    )
    assert fake["assets"] == [out]  # one warm start
    assert fake["eval_size"] == 300  # the recipe's held-out items are loaded
    assert len(fake["grpo"]) == 4 and fake["report"] == [[0, 1]]
    assert all(b == ["easy-vqa-heldout", "easy-vqa-heldout-unanswerable"] for b in fake["benches"])
    assert not any(a.startswith("data.val_files=") for c in fake["grpo"] for a in c)
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
    evaluated = [name for _, name, _ in fake["eval"]]
    assert evaluated == ["warm_start", "full-seed0", "baseline-seed0", "full-seed1", "baseline-seed1"]
    assert fake["eval"][0][0] == out / "warm_start"
    assert fake["eval"][2][0] == out / "rl/baseline-seed0/verl/global_step_2/actor/huggingface"

    pipeline.run_science(
        RECIPE, out, ["trainer.total_training_steps=2", "science.baseline=decoupled"], seeds=2, resume=True
    )
    assert len(fake["grpo"]) == 4 and len(fake["eval"]) == 5  # nothing redone
    assert {p for _, _, p in fake["eval"]} == {"decoupled"}
    assert not (out / "data" / "train-rlcr.parquet").exists()  # only the RLCR baseline needs it
    assert len(fake["report"]) == 2
    with pytest.raises(ValueError, match="other settings"):
        pipeline.run_science(
            RECIPE,
            out,
            ["trainer.total_training_steps=3", "science.baseline=decoupled"],
            seeds=2,
            resume=True,
        )


def test_rlcr_baseline_trains_on_rlcr_prompts_and_is_evaluated_under_rlcr(fake, tmp_path):
    """The recipe's baseline: RLCR rows (same items, order, images; RLCR's prompt) for its verl run, the
    warm start evaluated in both layouts, the RLCR run's checkpoint under --protocol rlcr."""
    from vlcal_verl.data.schema import prompt_text, read_parquet

    out = tmp_path / "run"
    pipeline.run_science(RECIPE, out, ["trainer.total_training_steps=2"])
    full_cmd, base_cmd = fake["grpo"]
    assert "ablation=rlcr" in base_cmd and not any(a.startswith("ablation=") for a in full_cmd)
    assert f"data.train_files={out / 'data' / 'train-rlcr.parquet'}" in base_cmd
    assert not any(a.startswith("data.train_files=") for a in full_cmd)
    assert [(name, proto) for _, name, proto in fake["eval"]] == [
        ("warm_start", "decoupled"),
        ("warm_start-rlcr", "rlcr"),
        ("full-seed0", "decoupled"),
        ("baseline-seed0", "rlcr"),
    ]
    src, dst = read_parquet(out / "data" / "train.parquet"), read_parquet(out / "data" / "train-rlcr.parquet")
    assert len(dst) == len(src) == 3
    for a, b in zip(src, dst, strict=True):
        q = a["extra_info"]["question"]
        assert a["prompt"][0]["content"] == prompt_text(q, "decoupled")
        assert b["prompt"] == [{"role": "user", "content": prompt_text(q, "rlcr")}]
        assert {k: v for k, v in a.items() if k != "prompt"} == {k: v for k, v in b.items() if k != "prompt"}


def test_rlcr_baseline_without_rlcr_warm_start_is_refused_before_work(fake, tmp_path):
    with pytest.raises(ValueError, match=r"needs demo\.warm_start_rlcr_fraction > 0"):
        pipeline.run_science(RECIPE, tmp_path / "run", ["demo.warm_start_rlcr_fraction=0.0"])
    assert fake["assets"] == [] and not (tmp_path / "run").exists()


def test_rlcr_rows_give_verl_the_prompt_the_warm_start_taught(tmp_path):
    """The RLCR copy of the training rows, read by verl's own dataset, tokenises to the very prompt the
    warm start trained the RLCR targets on (user_message(question, 'rlcr'))."""

    from vlcal_verl.data.easy_vqa import load_easy_vqa, to_verl_rows
    from vlcal_verl.data.schema import write_parquet
    from vlcal_verl.demo.data import user_message
    from vlcal_verl.evaluation.hf_generate import encode_prompts
    from vlcal_verl.testing.tiny_models import load_tiny_vlm
    from vlcal_verl.testing.verl_loop import rl_dataset

    _, processor = load_tiny_vlm("qwen3-vl", tokenizer="small")
    items = load_easy_vqa("train", limit=2, seed=3)
    write_parquet(to_verl_rows(items), tmp_path / "train.parquet")
    pipeline.write_protocol_copy(tmp_path / "train.parquet", tmp_path / "train-rlcr.parquet", "rlcr")
    ds = rl_dataset(tmp_path / "train-rlcr.parquet", processor)
    for i, it in enumerate(items):
        text = processor.apply_chat_template(ds[i]["raw_prompt"], add_generation_prompt=True, tokenize=False)
        assert "<confidence>N</confidence>" in text and "vision_confidence" not in text
        theirs = processor(text=[text], images=[it.image], return_tensors="pt")["input_ids"][0].tolist()
        ours = encode_prompts(processor, [user_message(it.question, "rlcr")], [it.image])
        assert ours["input_ids"][0][ours["attention_mask"][0].bool()].tolist() == theirs


def test_dev_evaluation_reads_no_test_item_and_evaluates_every_model_on_the_dev_pair(fake, tmp_path):
    """``science.evaluate_on=dev``: the assets are made without held-out items, the dev pair is written
    from the training split, every model is evaluated on it and verl's val_files points at it."""
    from vlcal_verl.data.schema import read_parquet

    out = tmp_path / "run"
    overrides = ["trainer.total_training_steps=2", "science.evaluate_on=dev", "demo.train_size=3"]
    pipeline.run_science(RECIPE, out, [*overrides, "demo.eval_size=4"])
    assert fake["eval_size"] == 0  # prepare_assets loads no test-split item
    assert not (out / "data" / "easy-vqa-heldout.parquet").exists()
    dev = read_parquet(out / "data" / "easy-vqa-dev.parquet")
    twins = read_parquet(out / "data" / "easy-vqa-dev-unanswerable.parquet")
    train_uids = {r["extra_info"]["uid"] for r in read_parquet(out / "data" / "train.parquet")}
    assert len(dev) == len(twins) == 4
    assert all(r["extra_info"]["uid"].startswith("easy-vqa/train/") for r in dev)
    assert not train_uids & {r["extra_info"]["uid"] for r in dev}
    assert [r["extra_info"]["uid"] + "#unanswerable" for r in dev] == [r["extra_info"]["uid"] for r in twins]
    assert len(fake["eval"]) == 4
    assert all(b == ["easy-vqa-dev", "easy-vqa-dev-unanswerable"] for b in fake["benches"])
    assert all(f"data.val_files={out / 'data' / 'easy-vqa-dev.parquet'}" in c for c in fake["grpo"])


def test_baseline_none_trains_and_evaluates_the_full_method_only(fake, tmp_path):
    out = tmp_path / "run"
    pipeline.run_science(RECIPE, out, ["trainer.total_training_steps=2", "science.baseline=none"], seeds=2)
    names = [next(a for a in c if a.startswith("trainer.experiment_name=")) for c in fake["grpo"]]
    assert names == [
        "trainer.experiment_name=science-full-seed0",
        "trainer.experiment_name=science-full-seed1",
    ]
    assert [name for _, name, _ in fake["eval"]] == ["warm_start", "full-seed0", "full-seed1"]


def test_an_override_one_arm_cannot_take_is_refused_before_any_work(fake, tmp_path):
    """``vlcal.reward.w_vis=2.0`` suits the full method, but the RLCR baseline has no c_v: its verl run would
    refuse it after the full method had trained (what happened to a real run); now nothing starts."""
    with pytest.raises(ValueError, match=r"the baseline arm \(ablation=rlcr\): .*no visual confidence"):
        pipeline.run_science(RECIPE, tmp_path / "run", ["vlcal.reward.w_vis=2.0"])
    assert fake["assets"] == [] and fake["grpo"] == []
