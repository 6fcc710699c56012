"""The science recipe's typed block and the per-run overrides it turns into."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlcal_verl.main import check_config_values, compose_recipe
from vlcal_verl.science.config import ScienceConfig
from vlcal_verl.science.pipeline import (
    arm_overrides,
    arm_protocol,
    arms,
    check_run_dir,
    run_seeds,
    science_config_of,
)

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "tiny_science.yaml"


def test_defaults_and_yaml_number_strings_are_cast():
    sc = ScienceConfig.from_dict({"seeds": "3", "target_ece_ratio": "7e-1"})
    assert (sc.seeds, sc.target_ece_ratio, sc.baseline) == (3, 0.7, "rlcr")
    assert ScienceConfig.from_dict({"baseline": "decoupled"}).baseline == "decoupled"  # still available


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ({"seed": 2}, "unknown key(s) in science: ['seed']"),
        ({"seeds": 0}, "science.seeds must be >= 1, got 0"),
        ({"seeds": 1.5}, "science.seeds must be a whole number"),
        ({"seeds": True}, "science.seeds must be of type int"),
        ({"seeds": "three"}, "science.seeds must be of type int"),
        ({"svis_last_steps": 0}, "science.svis_last_steps must be >= 1"),
        ({"baseline": "full"}, "science.baseline must be one of ['rlcr', 'decoupled', 'none'], got 'full'"),
        ({"evaluate_on": "test"}, "science.evaluate_on must be one of ['heldout', 'dev'], got 'test'"),
        ({"target_ece_ratio": 0}, "science.target_ece_ratio must be in (0, 1]"),
        ({"target_visual_auroc": 1.2}, "science.target_visual_auroc must be in [0, 1]"),
        ({"target_no_image_gap": 2}, "science.target_no_image_gap must be in [-1, 1]"),
    ],
)
def test_bad_values_name_the_field(block, message):
    with pytest.raises(ValueError) as err:
        ScienceConfig.from_dict(block)
    assert message in str(err.value)


def test_recipe_composes_and_holds_the_issue_sizes(tmp_path):
    config = compose_recipe(RECIPE, [f"demo.dir={tmp_path}"])
    sc = science_config_of(config)
    assert sc == ScienceConfig()  # the recipe states the defaults
    assert config.demo.eval_size >= 300  # ≥ 300 answerable + as many image-removed held-out items
    assert config.actor_rollout_ref.model.path == f"{tmp_path}/warm_start"


def test_each_arm_gets_its_own_folders_and_the_seed(tmp_path):
    sc = ScienceConfig(baseline="decoupled")
    run_dir = tmp_path / "rl" / "baseline-seed1"
    config = compose_recipe(RECIPE, [f"demo.dir={tmp_path}", *arm_overrides("baseline", 1, run_dir, sc)])
    check_config_values(config)  # the entry point's top-level key check accepts the science: block
    assert config.vlcal.ablation == "decoupled" and config.vlcal.vce.enabled is False
    assert config.trainer.default_local_dir == str(run_dir / "verl")
    assert config.trainer.rollout_data_dir == str(run_dir / "rollouts")
    assert (config.data.seed, config.actor_rollout_ref.rollout.seed, config.vlcal.vce.seed) == (1, 1, 1)
    full = compose_recipe(RECIPE, [f"demo.dir={tmp_path}", *arm_overrides("full", 1, run_dir, sc)])
    assert full.vlcal.ablation == "full" and full.vlcal.vce.enabled and full.vlcal.tar.enabled
    assert full.actor_rollout_ref.model.path == config.actor_rollout_ref.model.path  # one warm start
    assert list(arms(sc)) == ["full", "baseline"]
    assert run_seeds(4, ScienceConfig(seeds=3)) == [4, 5, 6]


def test_runs_are_not_mixed(tmp_path):
    manifest = {"recipe": "r.yaml", "overrides": ["a=1"]}
    check_run_dir(tmp_path / "new", manifest, resume=False)  # fresh folder: fine
    with pytest.raises(ValueError, match="nothing to resume"):
        check_run_dir(tmp_path / "new", manifest, resume=True)
    (tmp_path / "warm_start").mkdir()
    with pytest.raises(ValueError, match="warm_start is not a complete warm start"):
        check_run_dir(tmp_path, manifest, resume=False)
    (tmp_path / "warm_start" / "config.json").write_text("{}")
    check_run_dir(tmp_path, manifest, resume=False)  # only a copied warm start: reused
    (tmp_path / "other.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty and holds no science run"):
        check_run_dir(tmp_path, manifest, resume=False)
    (tmp_path / "run.json").write_text('{"recipe": "r.yaml", "overrides": ["a=1"]}')
    with pytest.raises(ValueError, match="pass --resume or a new --out"):
        check_run_dir(tmp_path, manifest, resume=False)
    check_run_dir(tmp_path, manifest, resume=True)  # same settings: resumes
    with pytest.raises(ValueError, match=r"other settings \(overrides\)"):
        check_run_dir(tmp_path, {"recipe": "r.yaml", "overrides": ["a=2"]}, resume=True)


def test_rlcr_baseline_trains_on_the_rlcr_prompted_rows_under_rlcr(tmp_path):
    """ablation=rlcr composes with the science recipe: one confidence, no VCE/TAR/visual term, the RLCR
    copy of the training rows; its evaluation parses RLCR's layout, the full method's the decoupled one."""
    sc = ScienceConfig(baseline="rlcr")
    run_dir, data = tmp_path / "rl" / "baseline-seed0", tmp_path / "data"
    over = arm_overrides("baseline", 0, run_dir, sc, data)
    config = compose_recipe(RECIPE, [f"demo.dir={tmp_path}", *over])
    check_config_values(config)
    v = config.vlcal
    assert (v.ablation, v.reward.protocol, v.reward.w_vis, v.vce.enabled, v.tar.enabled) == (
        "rlcr", "rlcr", 0.0, False, False,
    )  # fmt: skip
    assert config.data.train_files == str(data / "train-rlcr.parquet")
    full = compose_recipe(RECIPE, [f"demo.dir={tmp_path}", *arm_overrides("full", 0, run_dir, sc, data)])
    assert (
        full.data.train_files == f"{tmp_path}/data/train.parquet"
        and full.vlcal.reward.protocol == "decoupled"
    )
    assert config.actor_rollout_ref.model.path == full.actor_rollout_ref.model.path  # one warm start
    assert (arm_protocol("baseline", sc), arm_protocol("full", sc)) == ("rlcr", "decoupled")
    assert arm_protocol("baseline", ScienceConfig(baseline="decoupled")) == "decoupled"
    assert "data.train_files" not in " ".join(arms(ScienceConfig(baseline="decoupled"), data)["baseline"])


def test_recipe_warm_start_teaches_the_rlcr_layout_its_baseline_needs(tmp_path):
    from vlcal_verl.demo.pipeline import demo_config_of
    from vlcal_verl.science.pipeline import check_baseline

    config = compose_recipe(RECIPE, [f"demo.dir={tmp_path}"])
    dc, sc = demo_config_of(config), science_config_of(config)
    assert sc.baseline == "rlcr" and 0 < dc.warm_start_rlcr_fraction < 1
    check_baseline(dc, sc)
    dc.warm_start_rlcr_fraction = 0.0
    with pytest.raises(ValueError, match=r"needs demo\.warm_start_rlcr_fraction > 0"):
        check_baseline(dc, sc)
    check_baseline(dc, ScienceConfig(baseline="decoupled"))  # the decoupled baseline needs no RLCR targets
