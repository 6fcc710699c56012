"""The batch / parallel layout checks (:mod:`vlcal_verl.verl_ext.layout_check`).

Each rule against hand-computed layouts (and every refusal's suggested alternative re-checked), every
shipped recipe, the CLI on issue 26's failing command, and the rules that matter most against verl's own
code: the same numbers make verl's real function assert (or pad) as the check says.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vlcal_verl.main import compose_recipe
from vlcal_verl.verl_ext.layout_check import Layout, budget_warnings, first_problem, layout_problem

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
ISSUE = [
    "data.train_batch_size=3",
    "actor_rollout_ref.rollout.n=3",
    "actor_rollout_ref.actor.ppo_mini_batch_size=3",
]
FIELDS = {
    "data.train_batch_size": "batch",
    "actor_rollout_ref.actor.ppo_mini_batch_size": "mini",
    "actor_rollout_ref.rollout.n": "n",
    "trainer.n_gpus_per_node": "gpus_per_node",
}


def authors(**changes) -> Layout:
    """The authors' 4B run on one 8-GPU node: 256 prompts × 8 rollouts, one step per batch, dynamic bsz."""
    base = Layout(gpus_per_node=8, nnodes=1, batch=256, n=8, mini=256, max_prompt=4096, max_response=4096)
    return dataclasses.replace(base, **changes)


def alternatives(message: str) -> list[dict[str, int]]:
    """The ``key=value`` groups a refusal suggests after "e.g."/"use" (one dict per alternative)."""
    tail = re.split(r"use (?:a divisor of \d+, )?(?:e\.g\. )?", message, maxsplit=1)[1]
    groups = re.split(r",? or ", tail)
    return [{k: int(v) for k, v in re.findall(r"([\w.]+)=(\d+)", g) if k in FIELDS} for g in groups]


def assert_alternatives_pass(lay: Layout, message: str) -> None:
    options = alternatives(message)
    assert options and all(options), message
    for option in options:
        fixed = dataclasses.replace(lay, **{FIELDS[k]: v for k, v in option.items()})
        assert first_problem(fixed) is None, (option, first_problem(fixed))


# --- each rule, hand-computed ---------------------------------------------------------------------------


def test_valid_layouts_pass():
    assert first_problem(authors()) is None
    assert first_problem(authors(mini=32)) is None  # 8 optimizer steps per batch: standard PPO, allowed
    assert first_problem(authors(gpus_per_node=8, nnodes=4, tp=4, rollout_dp=2)) is None  # the 30B recipe
    assert first_problem(Layout(gpus_per_node=2, nnodes=1, batch=4, n=4, mini=4)) is None  # the CPU demo


def test_issue_mini_batch_not_divisible_by_data_parallel_size():
    lay = Layout(gpus_per_node=2, nnodes=1, batch=3, n=3, mini=3)  # 9 rollouts over 2 FSDP ranks
    msg = first_problem(lay)
    assert "= 3 × 3 = 9 rollouts per mini-batch is not divisible by the actor's data-parallel size 2" in msg
    assert "update_actor" in msg
    # no divisor of 3 works (M must be even): a batch of 4, n = 4, or one rank
    assert alternatives(msg) == [
        {"data.train_batch_size": 4, "actor_rollout_ref.actor.ppo_mini_batch_size": 4},
        {"actor_rollout_ref.rollout.n": 4},
        {"trainer.n_gpus_per_node": 1},
    ]
    assert_alternatives_pass(lay, msg)


def test_ulysses_shrinks_the_data_parallel_size():
    # 8 GPUs, Ulysses 4 → dp 2; 1 prompt × 2 rollouts = 2 per mini-batch: fine; 3 × 3 = 9: not
    assert first_problem(authors(batch=1, mini=1, n=2, actor_sp=4, ref_sp=4)) is None
    lay = authors(batch=3, mini=3, n=3, actor_sp=4, ref_sp=4)
    msg = first_problem(lay)
    assert "data-parallel size 2 (trainer.n_gpus_per_node × nnodes / Ulysses = 8 × 1 / 4)" in msg
    assert_alternatives_pass(lay, msg)


def test_mini_batch_of_7_is_37_uneven_steps():
    lay = authors(mini=7)
    # lcm(dp 8, 7 × 8 = 56) = 56; 2048 rollouts → 37 × 56 = 2072: 24 synthetic, 37 steps
    msg = first_problem(lay)
    assert "pads each batch with 24 synthetic no-op sequences into 37 uneven optimizer steps" in msg
    assert alternatives(msg) == [
        {"actor_rollout_ref.actor.ppo_mini_batch_size": m} for m in (4, 8, 256)
    ]  # nearest divisors of 256 and the authors' one step
    assert "256 (one optimizer step per batch, the authors' setting)" in msg
    assert_alternatives_pass(lay, msg)


def test_mini_batch_larger_than_the_batch():
    lay = authors(mini=300)
    msg = first_problem(lay)
    assert "ppo_mini_batch_size=300 is larger than data.train_batch_size=256" in msg
    assert "pad every step with 352 synthetic sequences" in msg  # (300 − 256) × 8
    assert alternatives(msg) == [{"actor_rollout_ref.actor.ppo_mini_batch_size": 256}]


@pytest.mark.parametrize("mini", [0, -4, "all", None, True])
def test_mini_batch_must_be_a_positive_integer(mini):
    assert "ppo_mini_batch_size must be a positive integer" in first_problem(authors(mini=mini))


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"actor_sp": 3, "ref_sp": 3}, "ulysses_sequence_parallel_size=3 does not divide the 8 GPUs"),
        ({"actor_sp": 2, "remove_padding": False}, "needs actor_rollout_ref.model.use_remove_padding=true"),
        ({"ref_sp": 3}, "ref.ulysses_sequence_parallel_size=3 does not divide"),
        ({"actor_sp": 8, "heads": (20, 4)}, "20 attention / 4 key-value heads cannot be split 8 ways"),
        ({"actor_sp": 4, "heads": (16, 3)}, "16 attention / 3 key-value heads cannot be split 4 ways"),
        ({"actor_fsdp_size": 3}, "fsdp_config.fsdp_size=3 must be -1"),
        ({"actor_fsdp_size": 0}, "fsdp_config.fsdp_size=0 must be -1"),
        ({"ref_fsdp_size": 5}, "ref.fsdp_config.fsdp_size=5"),
        ({"tp": 3}, "a rollout replica spans 3 GPUs"),
        ({"nnodes": 4, "tp": 4, "rollout_dp": 3}, "a rollout replica spans 12 GPUs"),  # 32 % 12
        ({"nnodes": 3, "tp": 4, "rollout_dp": 3}, "spans nodes of 8 GPUs unevenly"),  # 24 % 12 ok, 12 % 8
        (
            {"gpus_per_node": 6, "nnodes": 2, "tp": 4, "rollout_dp": 3},
            "multiple of tensor_model_parallel_size=4",
        ),
        ({"sync_step": 3}, "parameter_sync_step=3 must be a positive divisor of data.train_batch_size=256"),
        ({"gen_batch": 3}, "data.gen_batch_size=3 must be a positive divisor"),
    ],
)
def test_parallel_and_step_rules(changes, expected):
    msg = first_problem(authors(**changes))
    assert msg is not None and expected in msg, msg


@pytest.mark.parametrize(
    "changes",
    [
        {"actor_sp": 4, "ref_sp": 4, "heads": (16, 2)},  # KV heads repeated: 4 % 2 == 0
        {"actor_sp": 2, "ref_sp": 2, "heads": (32, 8)},
        {"actor_fsdp_size": 4, "ref_fsdp_size": 16},  # divisor; >= W means all
        {"ref_sp": 3, "use_ref": False},  # no reference model: its settings are not read
        {"nnodes": 2, "tp": 16},  # one replica over both nodes (16 = 2 × 8)
        {"sync_step": 4, "gen_batch": 64},
        # vLLM's rule only (12 GPUs: 192 × 8 rollouts divide evenly)
        {
            "rollout_name": "hf",
            "gpus_per_node": 6,
            "nnodes": 2,
            "tp": 4,
            "rollout_dp": 3,
            "batch": 192,
            "mini": 192,
        },
        {"fsdp": False, "mini": 7},  # not verl's FSDP engine: left to verl
    ],
)
def test_parallel_layouts_verl_accepts(changes):
    assert first_problem(authors(**changes)) is None


FIXED = {"actor_dynamic": False, "rollout_dynamic": False, "ref_dynamic": False}


def test_fixed_micro_batches():
    ok = dict(FIXED, actor_mbs=4, rollout_mbs=8, ref_mbs=16)
    assert first_problem(authors(**ok)) is None  # 2048 / 8 ranks = 256 per rank for every pass
    # per-rank mini-batch: 256 × 8 / 8 = 256 rollouts, not a multiple of 3
    msg = first_problem(authors(**dict(ok, actor_mbs=3)))
    assert "mini-batch of 256 rollouts (256 × 8 / 8 ranks) is not a multiple of" in msg
    msg = first_problem(authors(**dict(ok, rollout_mbs=3)))
    assert "gives each of 8 ranks [256] rollouts, not a multiple of actor_rollout_ref.rollout" in msg
    # a reference model with Ulysses 2 has 4 ranks of 512 rollouts
    msg = first_problem(authors(**dict(ok, ref_mbs=6, ref_sp=2)))
    assert "gives each of 4 ranks [512] rollouts, not a multiple of actor_rollout_ref.ref" in msg


def test_fixed_micro_batches_need_per_gpu_sizes():
    msg = first_problem(authors(**FIXED, rollout_mbs=8, ref_mbs=8, actor_mbs_global=64))
    assert "actor.ppo_micro_batch_size_per_gpu must be a positive integer" in msg and "deprecated" in msg
    msg = first_problem(authors(**FIXED, actor_mbs=4, rollout_mbs=8, ref_mbs=8, ref_mbs_global=64))
    assert "set actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu only" in msg
    msg = first_problem(authors(**FIXED, actor_mbs=4, rollout_mbs=8))  # the reference model's is missing
    assert "ref.log_prob_micro_batch_size_per_gpu must be a positive integer" in msg
    assert first_problem(authors(**FIXED, actor_mbs=4, rollout_mbs=8, use_ref=False)) is None


def test_dynamic_flags_must_match_and_budgets_be_set():
    msg = first_problem(authors(rollout_dynamic=False))
    assert (
        "use_dynamic_bsz=True and actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=False must match" in msg
    )
    msg = first_problem(authors(actor_tokens=None))
    assert "actor.ppo_max_token_len_per_gpu must be a positive integer with dynamic batch sizes" in msg


def test_fixed_micro_batches_need_rollouts_divisible_by_the_gpus():
    # Ulysses 2 on 8 GPUs: dp 4; 6 prompts × 2 = 12 rollouts pass the mini-batch rule (2 × 2 % 4 == 0)
    # but not verl's validate_config (12 % 8 GPUs)
    lay = authors(**FIXED, batch=6, mini=2, n=2, actor_sp=2, ref_sp=2, actor_mbs=1, rollout_mbs=1, ref_mbs=1)
    msg = first_problem(lay)
    assert "6 × 2 = 12 is not divisible by the 8 GPUs" in msg
    assert alternatives(msg) == [
        {"data.train_batch_size": 8, "actor_rollout_ref.actor.ppo_mini_batch_size": 2}
    ]
    assert_alternatives_pass(lay, msg)


def test_token_budget_below_the_longest_sequence_is_a_warning():
    assert budget_warnings(authors()) == []  # 16384 >= 4096 + 4096
    lay = authors(actor_tokens=4096, rollout_tokens=9000, ref_tokens=2048, ref_sp=2)
    warnings = budget_warnings(lay)
    assert len(warnings) == 2  # 9000 >= 8192; the ref's 2048 × Ulysses 2 = 4096 < 8192
    assert "actor.ppo_max_token_len_per_gpu=4096 (× Ulysses 1)" in warnings[0] and "= 8192" in warnings[0]
    assert "ref.log_prob_max_token_len_per_gpu=2048 (× Ulysses 2)" in warnings[1]
    assert first_problem(lay) is None  # not refused: shorter data may never reach the bound


# --- the composed config -------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_shipped_recipe_passes_without_warnings(recipe):
    warnings: list[str] = []
    assert layout_problem(compose_recipe(recipe), warn=warnings.append) is None
    assert warnings == []


def test_layout_read_from_the_cpu_recipe():
    cfg = compose_recipe(
        ROOT / "recipes" / "tiny_cpu.yaml",
        ["data.train_batch_size=6", "actor_rollout_ref.actor.fsdp_config.ulysses_sequence_parallel_size=2"],
    )
    lay = Layout.from_config(cfg)
    # device/cpu.yaml: 2 FSDP ranks on one machine; the mini-batch follows the batch (vlcal_trainer.yaml)
    assert (lay.world, lay.actor_sp, lay.dp, lay.batch, lay.mini, lay.n) == (2, 2, 1, 6, 6, 4)
    assert (lay.ref_sp, lay.use_ref, lay.actor_dynamic, lay.tp, lay.rollout_name) == (1, True, True, 1, "hf")
    assert (lay.max_prompt, lay.max_response, lay.actor_tokens) == (512, 96, 1536)


def test_dapo_filtering_forces_gen_batch_size_one():
    over = ["data.gen_batch_size=3"]
    cfg = compose_recipe(ROOT / "recipes" / "qwen3_vl_4b.yaml", over)
    assert "data.gen_batch_size=3" in layout_problem(cfg, warn=None)
    cfg = compose_recipe(
        ROOT / "recipes" / "qwen3_vl_4b.yaml", [*over, "algorithm.filter_groups.enable=true"]
    )
    assert layout_problem(cfg, warn=None) is None  # verl overrides it to 1 (trainer_base.py:733)


def test_model_heads_read_from_the_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text(
        '{"text_config": {"num_attention_heads": 20, "num_key_value_heads": 4}}'
    )
    cfg = compose_recipe(
        ROOT / "recipes" / "qwen3_vl_4b.yaml",
        [
            f"actor_rollout_ref.model.path={tmp_path}",
            "actor_rollout_ref.actor.ulysses_sequence_parallel_size=8",
        ],
    )
    assert "20 attention / 4 key-value heads cannot be split 8 ways" in layout_problem(cfg, warn=None)


# --- the CLI: one line, exit 2, before Ray -------------------------------------------------------------


def _main(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    from vlcal_verl.testing.ray_local import private_ray_env

    return subprocess.run(
        [sys.executable, "-m", "vlcal_verl.main", "--check", *args],
        cwd=cwd, env=private_ray_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_issue_command_exits_2_with_one_line_and_its_alternative_passes(tmp_path):
    out = _main(["--recipe", str(ROOT / "recipes" / "tiny_cpu.yaml"), *ISSUE], tmp_path)
    assert out.returncode == 2
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("[vlcal]")]
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert lines[0].startswith("[vlcal] config error: ") and "9 rollouts" in lines[0]
    assert "data-parallel size 2" in lines[0] and "ppo_mini_batch_size=4" in lines[0]
    fixed = [*ISSUE[:2], "data.train_batch_size=4", "actor_rollout_ref.actor.ppo_mini_batch_size=4"]
    out = _main(["--recipe", str(ROOT / "recipes" / "tiny_cpu.yaml"), *fixed], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.parametrize(("mini", "message"), [(7, "37 uneven optimizer steps"), (300, "is larger than")])
def test_issue_mini_batch_sizes_exit_2(tmp_path, mini, message):
    args = [
        "--recipe",
        str(ROOT / "recipes" / "qwen3_vl_4b.yaml"),
        f"actor_rollout_ref.actor.ppo_mini_batch_size={mini}",
    ]
    out = _main(args, tmp_path)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr


def test_refused_before_ray_or_verl_is_imported():
    code = (
        "import sys\n"
        "from vlcal_verl.main import ConfigError, compose_recipe, prepare\n"
        f"cfg = compose_recipe({str(ROOT / 'recipes' / 'tiny_cpu.yaml')!r}, {ISSUE!r})\n"
        "try:\n    prepare(cfg)\nexcept ConfigError as e:\n    print('refused', 'verl' in sys.modules, 'ray' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "refused False False", out.stderr[-2000:]


# --- against verl's own code: the same numbers, verl's real function ------------------------------------


class Reached(Exception):
    """Raised by a stand-in just past the assertion under test: verl's check let the numbers through."""


def _train_mini_batch(rows_per_rank: int, mini_batch_size: int, dp: int) -> str:
    """verl's ``TrainingWorker.train_mini_batch`` (workers/engine_workers.py:267) on a one-column batch, with
    an engine stand-in that reports ``dp`` and stops at the first call after the assertion."""
    from types import SimpleNamespace

    import torch
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu
    from verl.workers.engine_workers import TrainingWorker

    def reached():
        raise Reached

    worker = object.__new__(TrainingWorker)
    worker.engine = SimpleNamespace(get_data_parallel_size=lambda: dp, get_data_parallel_rank=reached)
    data = TensorDict({"x": torch.zeros(rows_per_rank, 1)}, batch_size=rows_per_rank)
    tu.assign_non_tensor(data, mini_batch_size=mini_batch_size)
    try:
        worker.train_mini_batch(data)
    except Reached:
        return "accepted"
    except AssertionError as err:
        return f"asserted: {err}"
    return "returned"


def test_verl_update_actor_asserts_what_the_check_refuses():
    bad = Layout(gpus_per_node=2, nnodes=1, batch=3, n=3, mini=3)
    assert first_problem(bad) is not None
    # the trainer sends mini_batch_size = M × n (trainer_base.py:1829) to each of the dp ranks
    verl = _train_mini_batch(5, bad.mini * bad.n, bad.dp)  # 9 rollouts on 2 ranks: 5 and 4
    assert verl == "asserted: Got mini_batch_size=9 and self.engine.get_data_parallel_size()=2"
    good = dataclasses.replace(bad, batch=4, mini=4)  # the check's suggested alternative
    assert first_problem(good) is None
    assert _train_mini_batch(6, good.mini * good.n, good.dp) == "accepted"


def _sync_trainer(config: dict):
    from omegaconf import OmegaConf
    from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

    trainer = object.__new__(PPOTrainerSync)
    trainer.config = OmegaConf.create(config)
    return trainer


def test_verl_pads_mini_batch_7_into_37_steps():
    """verl's own batch multiple (trainer_base.py:1589) gives the padding the refusal names."""
    lay = authors(mini=7)
    trainer = _sync_trainer(
        {
            "trainer": {"critic_warmup": 0},
            "actor_rollout_ref": {"actor": {"ppo_mini_batch_size": 7}, "rollout": {"n": 8}},
        }
    )
    trainer.use_critic, trainer.global_steps = False, 1
    multiple = trainer._get_required_batch_multiple(lay.dp)
    rollouts = lay.batch * lay.n
    padded = rollouts + (multiple - rollouts % multiple) % multiple  # upsample_batch_to_divisible_size
    assert (multiple, padded, padded // (lay.mini * lay.n)) == (56, 2072, 37)
    assert lay.padded == padded and "24 synthetic" in first_problem(lay)


def test_verl_skips_its_mini_batch_check_with_dynamic_batch_sizes():
    from verl.workers.config import FSDPActorConfig

    def validate(dynamic: bool) -> str:
        actor = FSDPActorConfig(
            strategy="fsdp2", rollout_n=8, ppo_mini_batch_size=300, use_dynamic_bsz=dynamic,
            ppo_micro_batch_size_per_gpu=1,
        )  # fmt: skip
        try:
            actor.validate(n_gpus=8, train_batch_size=256)
        except ValueError as err:
            return str(err)
        return "accepted"

    assert validate(False) == "train_batch_size (256) must be >= actor.ppo_mini_batch_size (300)"
    assert validate(True) == "accepted"  # the gap the check closes
    assert "is larger than" in first_problem(authors(mini=300))


def test_verl_parameter_sync_step_and_gen_batch_size():
    trainer = _sync_trainer({"data": {"train_batch_size": 256, "gen_batch_size": 3}})
    trainer.parameter_sync_step = 3

    def reached():
        raise Reached

    trainer.prepare_step = reached
    with pytest.raises(
        AssertionError, match=r"train_batch_size \(256\) must be divisible by parameter_sync_step"
    ):
        trainer.step({}, {})
    with pytest.raises(ValueError, match=r"multiple of gen_batch_size \(3\)"):
        trainer._next_train_batch()
    assert "parameter_sync_step=3" in first_problem(authors(sync_step=3))
    assert "gen_batch_size=3" in first_problem(authors(gen_batch=3))
    trainer.parameter_sync_step = 4
    with pytest.raises(Reached):
        trainer.step({}, {})
    assert first_problem(authors(sync_step=4)) is None


def test_verl_fixed_micro_batches_assert():
    import torch
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu
    from verl.workers.engine.utils import prepare_micro_batches

    def split(rows: int, micro: int) -> str:
        data = TensorDict({"x": torch.zeros(rows, 1)}, batch_size=rows)
        tu.assign_non_tensor(data, use_dynamic_bsz=False, micro_batch_size_per_gpu=micro)
        try:
            return f"{len(prepare_micro_batches(data)[0])} micro-batches"
        except AssertionError as err:
            return str(err)

    # 2 ranks, 4 prompts × 4 rollouts: each rank's mini-batch is 8 rollouts
    lay = Layout(
        gpus_per_node=2, nnodes=1, batch=4, n=4, mini=4, **FIXED, actor_mbs=3, rollout_mbs=4, ref_mbs=4
    )
    assert split(8, 3) == "data size must be divisible by force_group_size * micro_batch_size_per_gpu"
    assert "is not a multiple of actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=3" in first_problem(lay)
    assert split(8, 4) == "2 micro-batches"
    assert first_problem(dataclasses.replace(lay, actor_mbs=4)) is None


def test_verl_rollout_replica_asserts_what_the_check_refuses():
    from omegaconf import OmegaConf
    from verl.workers.rollout.replica import RolloutReplica

    class Replica(RolloutReplica):
        def launch_servers(self):
            pass

    def build(tp: int, dp: int) -> str:
        config = {"_target_": "verl.workers.config.RolloutConfig", "name": "vllm"}
        config |= {"tensor_model_parallel_size": tp, "data_parallel_size": dp}
        try:
            Replica(0, OmegaConf.create(config), None, gpus_per_node=8)
        except AssertionError as err:
            return str(err)
        return "accepted"

    assert build(4, 3) == "world_size 12 must be divisible by gpus_per_node 8"
    assert "spans nodes of 8 GPUs unevenly" in first_problem(authors(nnodes=3, tp=4, rollout_dp=3))
    assert build(4, 2) == "accepted"
    assert first_problem(authors(nnodes=4, tp=4, rollout_dp=2)) is None
