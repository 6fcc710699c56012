"""The science recipe's typed block and the per-run overrides it turns into."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlcal_verl.main import check_config_values, compose_recipe
from vlcal_verl.science.config import ScienceConfig
from vlcal_verl.science.pipeline import arm_overrides, arms, check_run_dir, run_seeds, science_config_of

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "tiny_science.yaml"


def test_defaults_and_yaml_number_strings_are_cast():
    sc = ScienceConfig.from_dict({"seeds": "3", "target_ece_ratio": "7e-1"})
    assert (sc.seeds, sc.target_ece_ratio, sc.baseline) == (3, 0.7, "decoupled")


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ({"seed": 2}, "unknown key(s) in science: ['seed']"),
        ({"seeds": 0}, "science.seeds must be >= 1, got 0"),
        ({"seeds": 1.5}, "science.seeds must be a whole number"),
        ({"seeds": True}, "science.seeds must be of type int"),
        ({"seeds": "three"}, "science.seeds must be of type int"),
        ({"svis_last_steps": 0}, "science.svis_last_steps must be >= 1"),
        ({"baseline": "rlcr"}, "the warm start writes the decoupled protocol"),
        ({"baseline": "full"}, "science.baseline must be one of ['decoupled']"),
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
    sc = ScienceConfig()
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
    (tmp_path / "other.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty and holds no science run"):
        check_run_dir(tmp_path, manifest, resume=False)
    (tmp_path / "run.json").write_text('{"recipe": "r.yaml", "overrides": ["a=1"]}')
    with pytest.raises(ValueError, match="pass --resume or a new --out"):
        check_run_dir(tmp_path, manifest, resume=False)
    check_run_dir(tmp_path, manifest, resume=True)  # same settings: resumes
    with pytest.raises(ValueError, match=r"other settings \(overrides\)"):
        check_run_dir(tmp_path, {"recipe": "r.yaml", "overrides": ["a=2"]}, resume=True)
