"""Every recipe × ablation composes with Hydra into a config verl 0.9.1 accepts.

"Accepts" = what ``verl.trainer.main_ppo.main`` checks before Ray starts (``auto_set_device`` +
``validate_config``) plus the rollout dataclass the workers build, via ``vlcal_verl.main.prepare``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from vlcal_verl.main import (
    CONFIG_DIR,
    KNOWN_TOP_LEVEL_KEYS,
    ConfigError,
    hydra_argv,
    prepare,
    verl_config_dir,
)

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes"
RUNNABLE = ["qwen3_vl_4b", "qwen3_vl_8b", "qwen3_vl_30b_a3b", "rlcr_qwen3_vl_4b", "internvl3_5_4b"]
ABLATIONS = ["full", "rlcr", "decoupled", "vce_entropy", "vce_kl", "vce_both"]
SEARCH = f"hydra.searchpath=[file://{CONFIG_DIR},file://{verl_config_dir()}]"


def _compose(name: str, overrides: list[str] = (), config_dir: Path = RECIPES):
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        return compose(config_name=name, overrides=[SEARCH, *overrides])


@pytest.mark.parametrize("recipe", RUNNABLE)
def test_recipe_passes_verl_validation(recipe):
    cfg = _compose(recipe)
    vcfg = prepare(cfg)
    assert cfg.trainer.use_v1 and cfg.trainer.v1.trainer_mode == "sync"
    # authors' settings (docs/design.md §6)
    r, a = cfg.actor_rollout_ref.rollout, cfg.actor_rollout_ref.actor
    assert (cfg.algorithm.adv_estimator, r.n, r.temperature, cfg.data.train_batch_size) == (
        "grpo",
        8,
        1.0,
        256,
    )
    assert (a.optim.lr, a.optim.weight_decay, a.kl_loss_type, a.kl_loss_coef) == (
        1e-6,
        1e-2,
        "low_var_kl",
        1e-4,
    )
    assert (cfg.data.max_prompt_length, cfg.data.max_response_length) == (4096, 4096)
    assert (r.val_kwargs.temperature, r.val_kwargs.top_p, cfg.trainer.total_epochs) == (0.6, 0.95, 15)
    if recipe != "internvl3_5_4b":  # InternVL tiles images (the checkpoint's processor settings)
        assert dict(cfg.data.mm_processor_kwargs) == {"min_pixels": 262144, "max_pixels": 4194304}
    assert cfg.reward.custom_reward_function.path == "pkg://vlcal_verl.rewards"
    assert dict(cfg.reward.custom_reward_function.reward_kwargs)["protocol"] == vcfg.reward.protocol
    # the authors' released run: PPO clip (0.2, 0.3), dual clip 3.0, one optimizer step per rollout batch,
    # validation every 10 steps, checkpoints every 100, no validation before training
    assert (a.clip_ratio_low, a.clip_ratio_high, a.clip_ratio_c) == (0.2, 0.3, 3.0)
    assert (a.ppo_mini_batch_size, a.ppo_epochs) == (cfg.data.train_batch_size, 1)
    assert (cfg.trainer.test_freq, cfg.trainer.save_freq, cfg.trainer.val_before_train) == (10, 100, False)
    # ... and its method: sampled-token signals, full masked forward, perception filter in verl's loss
    assert vcfg.variant == "authors" and vcfg.reward.reference_parity
    if vcfg.vce.enabled:
        assert (vcfg.vce.estimator, vcfg.vce.entropy, vcfg.vce.scope) == ("reference", "nll", "full")
        assert (vcfg.tar.kl, vcfg.tar.entropy, vcfg.tar.scope) == ("k3_clamped", "nll", "response")
        assert vcfg.perception.enabled and vcfg.perception.top_fraction == 0.2
        assert a.policy_loss.loss_mode == "vlcal_perception"
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_every_ablation_composes(ablation):
    cfg = _compose("qwen3_vl_4b", [f"ablation={ablation}"])
    v = prepare(cfg)
    expect = {
        "full": ("decoupled", True, "both", True),
        "rlcr": ("rlcr", False, "both", False),
        "decoupled": ("decoupled", False, "both", False),
        "vce_entropy": ("decoupled", True, "entropy", False),
        "vce_kl": ("decoupled", True, "kl", False),
        "vce_both": ("decoupled", True, "both", False),
    }[ablation]
    assert (v.reward.protocol, v.vce.enabled, v.vce.signal, v.tar.enabled) == expect
    assert (v.reward.w_vis == 0.0) == (not v.vce.enabled)
    assert v.perception.enabled == v.vce.enabled  # the filter needs the masked forward
    assert v.reward.w_brier == (0.8 if ablation == "rlcr" else 2.0)  # the authors' RLCR weight
    # each row its own run name, hence its own checkpoint folder
    assert cfg.trainer.experiment_name == ("qwen3_vl_4b" if ablation == "full" else f"qwen3_vl_4b-{ablation}")
    assert str(cfg.trainer.default_local_dir).endswith(f"/{cfg.trainer.experiment_name}")


def test_rows_and_variants_never_share_a_checkpoint_folder():
    dirs = set()
    for variant in ("authors", "exact"):
        for ablation in ABLATIONS:
            cfg = _compose("qwen3_vl_4b", [f"variant={variant}", f"ablation={ablation}"])
            prepare(cfg)
            dirs.add(str(cfg.trainer.default_local_dir))
    assert len(dirs) == 2 * len(ABLATIONS)


def test_exact_variant_is_one_switch():
    cfg = _compose("qwen3_vl_4b", ["variant=exact"])
    v = prepare(cfg)
    assert (v.vce.estimator, v.vce.entropy, v.vce.scope) == ("exact", "distribution", "truncated")
    assert (v.tar.kl, v.tar.entropy, v.tar.scope) == ("vce", "distribution", "vision_span")
    assert not v.perception.enabled and not v.reward.reference_parity
    assert cfg.actor_rollout_ref.actor.policy_loss.loss_mode == "vanilla"
    assert cfg.trainer.experiment_name == "qwen3_vl_4b-exact"


def test_known_top_level_keys_are_verls_plus_ours():
    with initialize_config_dir(config_dir=str(verl_config_dir()), version_base=None):
        verl_keys = set(compose(config_name="ppo_trainer").keys())
    assert verl_keys | {"vlcal", "demo", "science", "vlcal_model_family"} == KNOWN_TOP_LEVEL_KEYS


def test_moe_recipe_parallelism():
    cfg = _compose("qwen3_vl_30b_a3b")
    r = cfg.actor_rollout_ref.rollout
    assert r.expert_parallel_size == r.tensor_model_parallel_size * r.data_parallel_size
    assert cfg.actor_rollout_ref.actor.fsdp_config.param_offload
    with pytest.raises(Exception, match="expert_parallel_size must be equal"):  # hydra wraps verl's assert
        prepare(_compose("qwen3_vl_30b_a3b", ["actor_rollout_ref.rollout.expert_parallel_size=4"]))


def test_internvl_recipe_model_config_and_tiles():
    """The InternVL recipe builds this package's model config (InternVL's processor) and leaves tiling to
    the checkpoint's processor, for verl's agent loop and vLLM alike."""
    cfg = _compose("internvl3_5_4b")
    prepare(cfg)
    assert cfg.actor_rollout_ref.model._target_ == "vlcal_verl.verl_ext.model_config.VLCalModelConfig"
    assert cfg.data.mm_processor_kwargs is None and cfg.vlcal_model_family == "internvl"


def test_tiny_internvl_demo_without_null_kwargs_is_told_how_to_fix_it():
    """``demo.model_family=internvl`` alone keeps the demo's Qwen pixel budget: one line says what to set."""
    with pytest.raises(ConfigError, match=r"data\.mm_processor_kwargs=null"):
        prepare(_compose("tiny_cpu", ["demo.model_family=internvl"]))
    prepare(_compose("tiny_cpu", ["demo.model_family=internvl", "data.mm_processor_kwargs=null"]))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("+data.mm_processor_kwargs.max_pixels=1000", "Qwen-VL's"),
        ("+data.mm_processor_kwargs.foo=1", "not InternVL processor settings"),
        (
            "+actor_rollout_ref.rollout.engine_kwargs.vllm.mm_processor_kwargs.max_patches=6",
            "tile images differently",
        ),
        ("actor_rollout_ref.actor.ulysses_sequence_parallel_size=2", "no Ulysses patch for InternVL"),
    ],
)
def test_internvl_mismatches_refused_before_any_work(override, message):
    overrides = [override]
    if "engine_kwargs" in override:
        overrides.append("data.mm_processor_kwargs={max_patches: 12}")
    with pytest.raises(ConfigError, match=message):
        prepare(_compose("internvl3_5_4b", overrides))


def test_reward_server_url_switches_to_client():
    cfg = _compose("qwen3_vl_4b", ["vlcal.reward_server_url=http://rm:8000"])
    prepare(cfg)
    crf = cfg.reward.custom_reward_function
    assert crf.path == "pkg://reward_server.client" and crf.name == "compute_score"
    assert crf.reward_kwargs.server_url == "http://rm:8000" and crf.reward_kwargs.w_brier == 2.0
    from reward_server.client import ClientOptions

    opts = ClientOptions.from_kwargs(dict(crf.reward_kwargs))  # H4's client accepts exactly these
    assert (opts.server_url, opts.w_vis, opts.protocol) == ("http://rm:8000", 0.4, "decoupled")
    assert opts.reference_parity is True  # variant=authors: the server scores with the authors' rules too


def test_in_process_reward_kwargs_are_accepted_by_compute_score():
    from vlcal_verl.rewards import compute_score

    cfg = _compose("qwen3_vl_4b", ["ablation=rlcr"])
    prepare(cfg)
    out = compute_score(
        "t",
        "<confidence>7</confidence> \\boxed{4}",
        "4",
        **dict(cfg.reward.custom_reward_function.reward_kwargs),
    )
    assert out["accuracy"] == 1.0


@pytest.mark.parametrize(
    ("override", "error", "match"),
    [
        ("+vlcal.vce.typo=1", ValueError, r"unknown key\(s\) in vlcal.vce: \['typo'\]"),
        ("vlcal.vce.enabled=false", ValueError, "vlcal.tar.enabled needs vlcal.vce.enabled"),
        ("trainer.v1.trainer_mode=colocate_async", ValueError, "trainer_mode=sync"),
        ("actor_rollout_ref.actor.ulysses_sequence_parallel_size=2", ValueError, "ulysses"),
        ("actor_rollout_ref.rollout.temperature=0", AssertionError, "temperature should be greater than 0"),
        ("vlcal.tar.scope=vision-span", ConfigError, r"vlcal.tar.scope must be one of \['vision_span'"),
        ("vlcal.reward.protocol=decoupledd", ConfigError, "vlcal.reward.protocol must be one of"),
        ("vlcal.vce.estimator=k4", ConfigError, "vlcal.vce.estimator must be one of"),
        ("vlcal.reward.w_brier=.nan", ConfigError, "vlcal.reward.w_brier must be a finite number"),
        ("vlcal.node_watchdog_s=-5", ConfigError, r"vlcal.node_watchdog_s must be a number of seconds >= 0"),
        ("trainer.nnodes=two", ConfigError, "trainer.nnodes must be a positive integer"),
        ("trainer.n_gpus_per_node=eight", ConfigError, "trainer.n_gpus_per_node must be a positive integer"),
        ("actor_rollout_ref.rollout.n=1", ConfigError, r"rollout.n must be an integer >= 2"),
        ("+trainerr.total_epochs=1", ConfigError, r"unknown top-level key\(s\) \['trainerr'\]"),
        ("vlcal.vce.scope=truncated", ConfigError, "needs vlcal.vce.scope='full'"),
        ("actor_rollout_ref.actor.policy_loss.loss_mode=gspo", ConfigError, "loss_mode='gspo'"),
    ],
)
def test_bad_configs_fail_before_gpu_work(override, error, match):
    with pytest.raises(error, match=match):
        prepare(_compose("qwen3_vl_4b", [override]))


def test_default_config_without_recipe():
    cfg = _compose("vlcal_trainer", ["actor_rollout_ref.model.path=/models/x"], config_dir=CONFIG_DIR)
    prepare(cfg)


def test_hydra_argv_translates_recipe_and_check(monkeypatch):
    monkeypatch.setenv("VLCAL_CHECK_ONLY", "0")  # restored afterwards (hydra_argv sets it)
    argv = hydra_argv(["--check", "--recipe", str(RECIPES / "qwen3_vl_4b.yaml"), "ablation=rlcr"])
    assert argv[:4] == ["--config-path", str(RECIPES), "--config-name", "qwen3_vl_4b.yaml"]  # the file itself
    assert "ablation=rlcr" in argv and argv[-1] == SEARCH
    assert "hydra.output_subdir=null" in argv and "hydra.run.dir=." in argv  # a check writes nothing
    import os

    assert os.environ["VLCAL_CHECK_ONLY"] == "1"
    assert hydra_argv(["ablation=rlcr", f"--recipe={RECIPES / 'qwen3_vl_4b.yaml'}", "--check"]) == argv


def test_image_pixel_budget_reaches_the_qwen3_vl_processor(tmp_path):
    """verl's agent loop passes data.mm_processor_kwargs to the processor: a small image is scaled up to
    ≥ 262,144 pixels and a large one down to ≤ 4,194,304 (in whole 32-px merged cells)."""
    import numpy as np
    from PIL import Image
    from transformers import AutoProcessor

    from vlcal_verl.testing.tiny_models import build_tiny_vlm

    kwargs = dict(_compose("qwen3_vl_4b").data.mm_processor_kwargs)
    proc = AutoProcessor.from_pretrained(build_tiny_vlm("qwen3-vl", cache_dir=tmp_path))
    patch = proc.image_processor.patch_size
    text = "<|vision_start|><|image_pad|><|vision_end|>hi"
    for h, w in ((64, 96), (3000, 2500)):
        img = Image.fromarray(np.zeros((h, w, 3), dtype="uint8"))
        _, gh, gw = proc(text=[text], images=[img], return_tensors="pt", **kwargs)["image_grid_thw"][
            0
        ].tolist()
        assert 262144 <= gh * gw * patch * patch <= 4194304, (h, w, gh, gw)


@pytest.mark.parametrize(
    "args",
    [
        ["--recipe", "recipes/tiny_cpu.yaml", "demo.dir=/tmp/vlcal-demo"],
        ["--recipe", "recipes/qwen3_vl_4b.yaml", "+device=cpu", "actor_rollout_ref.model.path=/m"],
    ],
)
def test_cpu_device_check_in_a_fresh_process(args):
    """`--check` with the CPU backend: verl is first imported after VERL_PLATFORM=cpu is exported."""
    import subprocess
    import sys

    from vlcal_verl.testing.ray_local import private_ray_env

    env = {k: v for k, v in private_ray_env().items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    out = subprocess.run(
        [sys.executable, "-m", "vlcal_verl.main", "--check", *args, "hydra.run.dir=/tmp/vlcal-check-hydra"],
        cwd=RECIPES.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "[vlcal] config OK" in out.stdout
    assert "Falling back to 'nvidia'" not in out.stdout + out.stderr  # the CPU platform was chosen


@pytest.mark.parametrize(
    ("recipe", "overrides", "compiled"),
    [
        ("tiny_cpu", [], False),
        ("qwen3_vl_4b", ["+device=cpu", "actor_rollout_ref.model.path=/m"], False),
        ("qwen3_vl_4b", [], True),
    ],
)
def test_entropy_compile_off_on_cpu_only(recipe, overrides, compiled):
    """verl's FSDP engine compiles its entropy when ``fsdp_config.use_torch_compile``; on the CPU device the
    actor's and the reference's engine configs (as verl builds them) say no, on a GPU recipe verl's default
    (compile) stays."""
    from verl.utils.config import omega_conf_to_dataclass
    from verl.workers.config import FSDPEngineConfig

    cfg = _compose(recipe, overrides)
    for role in ("actor", "ref"):
        engine = omega_conf_to_dataclass(cfg.actor_rollout_ref[role].fsdp_config)
        assert isinstance(engine, FSDPEngineConfig)
        assert engine.use_torch_compile is compiled, role


def _check(args: list[str], cwd: Path):
    import subprocess
    import sys

    from vlcal_verl.testing.ray_local import private_ray_env

    return subprocess.run(
        [sys.executable, "-m", "vlcal_verl.main", "--check", *args],
        cwd=cwd, env=private_ray_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_check_writes_nothing_prints_config_and_warns_about_missing_paths(tmp_path):
    out = _check(["--print-config", "--recipe", str(RECIPES / "qwen3_vl_4b.yaml")], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []  # no outputs/DATE/, no .hydra, no log file
    printed = OmegaConf.create(yaml.safe_load(out.stdout))  # stdout is the YAML and nothing else
    assert printed.actor_rollout_ref.actor.policy_loss.loss_mode == "vlcal_perception"  # after the wiring
    assert printed.vlcal.variant == "authors"
    assert "[vlcal] warning: actor_rollout_ref.model.path does not exist here" in out.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["vlcal.reward.w_brierr=1"], "config error: Could not override 'vlcal.reward.w_brierr'"),
        (["variant=exactt"], "Available options in 'variant': authors exact"),
        (["vlcal.vce.mask_prob=abc"], "vlcal.vce.mask_prob must be a number"),
        (["trainer.n_gpus_per_node=eight"], "trainer.n_gpus_per_node must be a positive integer"),
    ],
)
def test_check_mistakes_are_one_line_and_exit_2(tmp_path, args, message):
    out = _check(["--recipe", str(RECIPES / "qwen3_vl_4b.yaml"), *args], tmp_path)
    assert out.returncode == 2
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("[vlcal]")]
    assert len(errors) == 1 and message in errors[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr
