"""The cluster path on one machine: ``launch/submit.sh`` jobs on a two-node Ray cluster, killed and resumed.

One Ray cluster for the module (:class:`vlcal_verl.testing.ray_cluster.LocalCluster`): a head and a worker
node started with ``ray start`` on 127.0.0.1, one logical accelerator slot each, so verl's two FSDP ranks
(``--nodes 2 --gpus-per-node 1``) must land on different nodes. Every job goes through launch/submit.sh to
the head's dashboard, as from a login node. Four verl starts in all.

Every leg runs with ``actor_rollout_ref.rollout.full_determinism=true`` (the HF rollout seeds each request
by its prompt and its arrival count), so runs of the same steps can be compared number for number.

- ``uninterrupted`` — 3 GRPO steps, checkpoint every step: ranks on two node ids (Ray's state API),
  SUCCEEDED (``ray job status``), vce/* and tar/* on the step lines; its steps are the reference.
- ``chain`` — one checkpoint folder, three faults in a row, each resubmitted with the same command:
  1. the driver SIGKILLed while global_step_3's save is held open (test hook
     :mod:`vlcal_verl.testing.save_hold`) — step 2's checkpoint complete, step 3's half written → FAILED,
     nothing of the run left; the resubmitted job resumes from global_step_2 at step 3, with
     global_step_2's weights and Adam moments, and its step 3 (prompts, responses, loss) is the
     uninterrupted run's step 3, as the killed job's steps 1–2 are its steps 1–2;
  2. the worker node's raylet SIGKILLed in step 4 (global_step_3 complete, step 4's save held open) →
     FAILED within 120 s, the reason in ``ray job logs``, no process of the run left;
  3. a head alone restarted with two slots, ``--nodes 1 --gpus-per-node 2`` → resumes at step 4; then
     ``ray job stop`` while step 5's save is held open → STOPPED, nothing left, the tracker names step 4.
- the node watchdog (:mod:`vlcal_verl.verl_ext.node_watchdog`): a stand-in driver waiting forever while an
  actor of its job sits on a fresh worker node; the node's raylet SIGKILLed → exit 3 within 120 s. (A verl
  job whose node dies *during generation* hung: its agent loop waited on the lost node's requests for
  6 min and more; the watchdog is what ends it.)

Without ``full_determinism`` the HF rollout samples from one RNG per server in request order, and two fresh
runs already differed at step 1 (pg_loss −0.0028 vs −0.0305 measured).

verl 0.9.1 writes ``latest_checkpointed_iteration.txt`` only after every part of a step's checkpoint is on
disk (``_save_checkpoint``) and resumes from the step it names (``find_latest_ckpt_path``), so a folder
left half written by a kill is skipped, not loaded; the tests assert exactly that.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vlcal_verl.testing import recorder
from vlcal_verl.testing.ray_cluster import BIN, LocalCluster
from vlcal_verl.testing.save_hold import ENV as HOLD_ENV
from vlcal_verl.testing.verl_loop import LOOP_TEST_TIMEOUT_S, finite, steps_of

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(LOOP_TEST_TIMEOUT_S)]

JOB_TIMEOUT_S = 900
NODE_LOSS_LIMIT_S = 120
STEPS = 4  # the fault chain's trainer.total_training_steps
ENV_KEY = "+ray_kwargs.ray_init.runtime_env.env_vars"


@pytest.fixture(scope="module")
def cluster():
    """A head and one worker node, one logical accelerator slot each; every process stopped at the end."""
    c = LocalCluster()
    try:
        c.start_head(gpus=1)
        c.start_worker(gpus=1)
        yield c
    finally:
        left = c.stop()
    assert not left, f"processes of the cluster survived SIGKILL: {left}"


def overrides(assets: Path, out: Path, leg: str, steps: int, env: dict[str, str] | None = None) -> list[str]:
    """The job's Hydra overrides: the small demo assets, this run's checkpoint folder, per-leg rollout
    dumps and metrics file (verl's ``file`` logger, in the task runner: through the runtime env)."""
    env = {"VERL_FILE_LOGGER_PATH": str(out / f"metrics-{leg}.jsonl"), **(env or {})}
    return [
        f"demo.dir={assets}", f"trainer.default_local_dir={out / 'ckpt'}",
        f"trainer.rollout_data_dir={out / f'dump-{leg}'}", f"trainer.total_training_steps={steps}",
        "trainer.save_freq=1", f"hydra.run.dir={out / f'hydra-{leg}'}",
        "actor_rollout_ref.rollout.full_determinism=true",
        *(f"{ENV_KEY}.{k}={v}" for k, v in env.items()),
    ]  # fmt: skip


def tracker(out: Path) -> int | None:
    path = out / "ckpt" / "latest_checkpointed_iteration.txt"
    return int(path.read_text()) if path.exists() and path.read_text().strip() else None


def submit(c: LocalCluster, name: str, nodes: int, gpus: int, args: list[str]) -> str:
    sid = f"{name}-{uuid.uuid4().hex[:6]}"
    c.submit(sid, nodes, gpus, args)
    return sid


def run_processes(c: LocalCluster, sid: str) -> list[int]:
    """The PIDs of the job: its driver and every actor process, from Ray."""
    return [c.driver_pid(sid), *(a.pid for a in c.actors(sid) if a.pid)]


def wait_gone(pids: list[int], timeout_s: float = 60) -> list[int]:
    """PIDs of ``pids`` still running after up to ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while (alive := [p for p in pids if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.5)
    return alive


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def uninterrupted(cluster, small_demo_assets, tmp_path_factory):
    """Three steps on both nodes, nothing killed."""
    out = tmp_path_factory.mktemp("uninterrupted")
    t0 = time.monotonic()
    sid = submit(cluster, "uninterrupted", 2, 1, overrides(small_demo_assets, out, "a", 3))
    status = cluster.wait_end(sid, JOB_TIMEOUT_S)
    wall = time.monotonic() - t0
    cli = subprocess.run(
        [str(BIN / "ray"), "job", "status", sid, "--address", cluster.address],
        env=cluster.env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    print(f"[cluster] uninterrupted 3 steps on 2 nodes: {wall:.1f} s")
    return SimpleNamespace(
        out=out, sid=sid, status=status, cli=cli.stdout + cli.stderr, logs=cluster.logs(sid),
        actors=cluster.actors(sid), nodes=_node_ids(cluster), steps=steps_of(out / "metrics-a.jsonl"), wall=wall,
    )  # fmt: skip


def _node_ids(c: LocalCluster) -> dict[str, bool]:
    from ray.util.state import list_nodes

    """Alive nodes: id → is the head."""
    nodes = list_nodes(address=c.address, detail=True)
    return {n.node_id: bool(n.is_head_node) for n in nodes if n.state == "ALIVE"}


def test_two_nodes_one_job(uninterrupted):
    """Ranks on two node ids; SUCCEEDED; step 3's checkpoint; vce/* and tar/* on every step line."""
    u = uninterrupted
    assert u.status == "SUCCEEDED", u.logs[-6000:]
    assert f"Job '{u.sid}' succeeded" in u.cli, u.cli  # `ray job status` on the head's address
    ranks = [a for a in u.actors if a.class_name.endswith("WorkerDict")]
    assert len(ranks) == 2, [(a.class_name, a.name) for a in u.actors]
    assert {a.node_id for a in ranks} == set(u.nodes) and len(u.nodes) == 2  # one rank per node
    assert (u.out / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    assert (u.out / "ckpt" / "global_step_3" / "data.pt").is_file()
    assert list((u.out / "ckpt" / "global_step_3" / "actor").glob("model_world_size_2_rank_*.pt"))
    lines = [line for line in u.logs.splitlines() if " step:" in line]
    assert len(lines) == 3, lines
    for line in lines:
        assert " - vce/" in line and " - tar/" in line, line[:300]
    assert [s["step"] for s in u.steps] == [1, 2, 3]
    for s in u.steps:
        assert finite(s["data"]["actor/pg_loss"]) and finite(s["data"]["vce/s/mean"])


@pytest.fixture(scope="module")
def chain(cluster, small_demo_assets, tmp_path_factory, uninterrupted):
    """One checkpoint folder through three faults and a move to the head alone (module docstring); what each
    leg left behind (job logs also under ``<out>/job-<leg>.log``)."""
    out = tmp_path_factory.mktemp("chain")
    hold = out / "hold"
    legs: dict[str, SimpleNamespace] = {}

    # 1. the driver SIGKILLed (a preempted login node, an OOM kill) while global_step_3's save is held open
    # (step 2's checkpoint complete)
    t0 = time.monotonic()
    sid = submit(
        cluster, "kill", 2, 1, overrides(small_demo_assets, out, "1", STEPS, {HOLD_ENV: f"3:{hold}"})
    )
    cluster.wait_for(
        sid, lambda: len(list(hold.glob("held-*"))) == 2, "global_step_3 held by both ranks", 600
    )
    pids = run_processes(cluster, sid)
    half = sorted(p.name for p in (out / "ckpt" / "global_step_3").rglob("*") if p.is_file())
    seen = SimpleNamespace(tracker=tracker(out), half=half)
    os.kill(cluster.driver_pid(sid), signal.SIGKILL)
    legs["kill"] = SimpleNamespace(
        sid=sid, status=cluster.wait_end(sid, 120), left=wait_gone(pids), seen=seen, logs=cluster.logs(sid),
        wall=time.monotonic() - t0,
    )  # fmt: skip

    # 2. resubmitted (recorder on: the state it loads); the worker node's raylet killed in step 4, while its
    # checkpoint is held open: a deterministic point of the step (during generation: test_node_watchdog_*)
    t0 = time.monotonic()
    rec, hold4 = out / "record-2", out / "hold-4"
    env = {recorder.ENV: str(rec), HOLD_ENV: f"4:{hold4}"}
    sid = submit(cluster, "nodeloss", 2, 1, overrides(small_demo_assets, out, "2", STEPS, env))
    cluster.wait_for(sid, lambda: len(list(hold4.glob("held-*"))) == 2, "global_step_4 held", 600)
    pids = run_processes(cluster, sid)
    worker = cluster.nodes[1]
    cluster.track()
    worker_pids = [p for p in cluster.seen if _under(p, worker)]
    killed_at = time.monotonic()
    worker.raylet().kill()
    status = cluster.wait_end(sid, JOB_TIMEOUT_S)
    failed_after = time.monotonic() - killed_at
    legs["nodeloss"] = SimpleNamespace(
        sid=sid, status=status, failed_after=failed_after, logs=cluster.logs(sid), record=rec,
        left=wait_gone(pids + worker_pids, 30), wall=time.monotonic() - t0,
    )  # fmt: skip

    # 3. the head alone, restarted with two slots (the lost node's slot is gone with it): resumes at step 4;
    # then `ray job stop` while step 5's save is held open
    t0 = time.monotonic()
    for node in list(cluster.nodes):
        cluster.stop_node(node)
    cluster.start_head(gpus=2)
    hold5 = out / "hold-5"
    sid = submit(
        cluster,
        "headalone",
        1,
        2,
        overrides(small_demo_assets, out, "3", STEPS + 1, {HOLD_ENV: f"5:{hold5}"}),
    )
    cluster.wait_for(sid, lambda: len(list(hold5.glob("held-*"))) == 2, "global_step_5 held", 600)
    pids = run_processes(cluster, sid)
    actors = cluster.actors(sid)
    seen = SimpleNamespace(tracker=tracker(out))
    stop = subprocess.run(
        [str(BIN / "ray"), "job", "stop", sid, "--address", cluster.address],
        env=cluster.env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    legs["headalone"] = SimpleNamespace(
        sid=sid, status=cluster.wait_end(sid, 120), left=wait_gone(pids), seen=seen, cli=stop.stdout + stop.stderr,
        logs=cluster.logs(sid), actors=actors, wall=time.monotonic() - t0,
    )  # fmt: skip
    for name, leg in legs.items():
        (out / f"job-{name}.log").write_text(leg.logs)  # the head was restarted: its job table is new
        print(f"[cluster] {name}: {leg.status} after {leg.wall:.1f} s")
    print(f"[cluster] node loss -> FAILED in {legs['nodeloss'].failed_after:.1f} s")
    return SimpleNamespace(out=out, **legs)


def _under(pid: int, node) -> bool:
    """``pid`` is a descendant of ``node``'s ``ray start`` process."""
    import psutil

    try:
        return any(p.pid == node.proc.pid for p in psutil.Process(pid).parents())
    except psutil.Error:
        return False


def test_driver_killed_while_saving_leaves_the_previous_checkpoint(chain):
    """The driver SIGKILLed while global_step_3 is being written: FAILED, every process of the run gone (Ray
    ends a dead driver's actors), the tracker still names step 2 and global_step_3 holds the ranks' files
    but not verl's data.pt."""
    leg = chain.kill
    assert leg.status == "FAILED", leg.logs[-4000:]
    assert not leg.left, f"processes of the killed run still alive: {leg.left}"
    assert leg.seen.tracker == 2
    assert "model_world_size_2_rank_0.pt" in leg.seen.half and "data.pt" not in leg.seen.half


def test_resume_after_the_kill_continues_at_step_3_with_the_data_order(
    chain, uninterrupted, small_demo_assets
):
    """The resubmitted job loads global_step_2 (not the half global_step_3, not step 0) and its step 3
    trains on the prompts the uninterrupted run saw at step 3 — verl's seeded sampler's batch 3."""
    logs = chain.nodeloss.logs
    assert "Resuming from" in logs and f"{chain.out}/ckpt/global_step_2" in logs, logs[-4000:]
    assert "Training from scratch" not in logs
    steps = steps_of(chain.out / "metrics-2.jsonl")
    assert [s["step"] for s in steps][:1] == [3]
    resumed = dumped_prompts(chain.out / "dump-2" / "3.jsonl")
    reference = dumped_prompts(uninterrupted.out / "dump-a" / "3.jsonl")
    assert resumed == reference
    assert questions(resumed, small_demo_assets) == expected_batch(small_demo_assets, step=3)


DETERMINISTIC = (
    "actor/pg_loss",
    "actor/grad_norm",
    "critic/score/mean",
    "response_length/mean",
    "vce/k_bar/mean",
)


def test_full_determinism_repeats_the_uninterrupted_run_across_the_stop(chain, uninterrupted):
    """``rollout.full_determinism=true`` on every leg (verl's switch; the HF rollout then seeds each request
    by its prompt and its arrival count): the killed leg's steps 1–2 repeat the uninterrupted run's, and
    the resumed step 3 generates the same responses and trains with the same loss as its step 3."""
    ref = {s["step"]: s["data"] for s in uninterrupted.steps}
    first = {s["step"]: s["data"] for s in steps_of(chain.out / "metrics-1.jsonl")}
    resumed = {s["step"]: s["data"] for s in steps_of(chain.out / "metrics-2.jsonl")}
    assert sorted(first) == [1, 2] and 3 in resumed
    # the same responses, but the copies of a prompt may arrive (and so sit in the batch) in another order:
    # sums reassociate (two fresh 2-step runs on one node: ≤ 3e-6 relative apart)
    for step, got in ((1, first[1]), (2, first[2]), (3, resumed[3])):
        for key in DETERMINISTIC:
            assert got[key] == pytest.approx(ref[step][key], rel=1e-4, abs=1e-7), (step, key)
    responses = dumped_responses(chain.out / "dump-2" / "3.jsonl")
    assert responses == dumped_responses(uninterrupted.out / "dump-a" / "3.jsonl")
    per_prompt = Counter(prompt for prompt, _ in responses)  # distinct responses of each prompt's n copies
    assert max(per_prompt.values()) > 1, "the copies of every prompt sampled one and the same response"


def test_resume_restores_weights_and_adam_moments(chain):
    """After the resume's load, each rank's weights and Adam state (step, both moments) equal, tensor for
    tensor, what verl saved at global_step_2 (ported from the CPU loop tests' resumed run)."""
    loaded = recorder.load(chain.nodeloss.record, "actor_after_load")
    assert sorted(int(r["rank"]) for r in loaded) == [0, 1]
    folder = chain.out / "ckpt" / "global_step_2" / "actor"
    for rec in loaded:
        assert Path(rec["path"]).resolve() == folder.resolve()
        rank = int(rec["rank"])
        saved_model = torch.load(folder / f"model_world_size_2_rank_{rank}.pt", weights_only=False)
        saved_optim = torch.load(folder / f"optim_world_size_2_rank_{rank}.pt", weights_only=False)
        assert set(rec["model"]) == set(saved_model)
        for name, value in saved_model.items():
            assert torch.equal(rec["model"][name], _local(value)), name
        state, saved_state = rec["optimizer"]["state"], saved_optim["state"]
        assert set(state) == set(saved_state) and saved_state
        moments = 0
        for idx, entry in saved_state.items():
            assert set(state[idx]) == set(entry) >= {"step", "exp_avg", "exp_avg_sq"}, idx
            for k, v in entry.items():
                assert torch.equal(state[idx][k], _local(v)), (idx, k)
            moments += int(_local(entry["exp_avg_sq"]).count_nonzero())
        assert moments > 0, "the saved Adam moments are all zero: nothing to restore"


def test_lost_node_fails_the_job_in_bounded_time(chain):
    """The worker's raylet killed in step 4 (its save held open): FAILED within 120 s, the reason in the job's
    logs (Ray's dead-actor error, or the driver's node watchdog, whichever sees it first), no process of the
    run (driver, actors, the lost node's processes) left."""
    leg = chain.nodeloss
    assert leg.status == "FAILED", leg.logs[-4000:]
    assert leg.failed_after <= NODE_LOSS_LIMIT_S, leg.failed_after
    assert any(m in leg.logs for m in NODE_LOSS_REASONS), leg.logs[-4000:]
    assert not leg.left, f"processes of the run left after the node loss: {leg.left}"


NODE_LOSS_REASONS = (
    "ActorDiedError",
    "ActorUnavailableError",
    "node died",
    "RayletDiedError",
    "[vlcal] node lost",
)


def test_head_alone_resumes_from_the_checkpoint_and_stops_cleanly(chain):
    """``--nodes 1 --gpus-per-node 2`` on a head alone: resumes from global_step_3 at step 4, both ranks on
    the one node; ``ray job stop`` while step 5 is being written → STOPPED, nothing of the run left, the
    tracker names step 4."""
    leg = chain.headalone
    assert f"{chain.out}/ckpt/global_step_3" in leg.logs and "Training from scratch" not in leg.logs
    assert [s["step"] for s in steps_of(chain.out / "metrics-3.jsonl")] == [4]
    ranks = [a for a in leg.actors if a.class_name.endswith("WorkerDict")]
    assert len(ranks) == 2 and len({a.node_id for a in ranks}) == 1
    assert leg.status == "STOPPED", leg.cli
    assert not leg.left, f"processes of the stopped run still alive: {leg.left}"
    assert leg.seen.tracker == STEPS == tracker(chain.out)


def _local(value):
    return (value.to_local() if hasattr(value, "to_local") else value).detach().cpu()


def dumped_prompts(dump: Path) -> Counter:
    """(prompt text, ground truth) of verl's rollout dump of one step (uids are verl's fresh uuid4s)."""
    rows = [json.loads(line) for line in dump.read_text().splitlines() if line.strip()]
    return Counter((r["input"], r["gts"]) for r in rows)


def dumped_responses(dump: Path) -> Counter:
    """(prompt text, response text) of verl's rollout dump of one step."""
    rows = [json.loads(line) for line in dump.read_text().splitlines() if line.strip()]
    return Counter((r["input"], r["output"]) for r in rows)


def questions(prompts: Counter, root: Path) -> Counter:
    """The training questions inside dumped prompts, with their counts."""
    from vlcal_verl.data.schema import read_parquet

    known = {r["extra_info"]["question"] for r in read_parquet(root / "data" / "train.parquet")}
    out: Counter = Counter()
    for (text, gts), n in prompts.items():
        found = [q for q in known if f"\n{q}\n" in text]
        assert found, f"no training question in the dumped prompt {text[:200]!r}"
        out[(max(found, key=len), gts)] += n
    return out


def expected_batch(root: Path, step: int) -> Counter:
    """(question, answer) pairs of GRPO step ``step`` from verl's own seeded sampler (×n rollouts)."""
    from omegaconf import OmegaConf
    from verl.trainer.ppo.utils import create_rl_sampler

    from vlcal_verl.commands.train import DEFAULT_RECIPE
    from vlcal_verl.data.schema import read_parquet
    from vlcal_verl.main import compose_recipe

    cfg = compose_recipe(DEFAULT_RECIPE, [f"demo.dir={root}"])
    rows = read_parquet(root / "data" / "train.parquet")
    order = list(
        create_rl_sampler(OmegaConf.create({"shuffle": True, "seed": cfg.data.seed}), range(len(rows)))
    )
    b, n = int(cfg.data.train_batch_size), int(cfg.actor_rollout_ref.rollout.n)
    return Counter(
        {
            (rows[i]["extra_info"]["question"], rows[i]["reward_model"]["ground_truth"]): n
            for i in order[(step - 1) * b : step * b]
        }
    )


def test_node_watchdog_ends_a_driver_waiting_on_a_lost_node(cluster, chain, tmp_path):
    """The hang the watchdog exists for (verl's agent loop waiting on a lost node's requests) with a
    stand-in driver: it waits forever on nothing, an actor of its job on a worker node; the worker's raylet
    SIGKILLed → the driver exits 3 within 120 s with one line naming the node. Runs after the chain, on its
    head, with a fresh worker node."""
    import sys

    worker = cluster.start_worker(gpus=1)
    node_id = next(nid for nid, head in _node_ids(cluster).items() if not head)
    ready = tmp_path / "ready"
    cmd = [sys.executable, "-m", "vlcal_verl.testing.watchdog_driver", cluster.gcs, node_id, str(ready)]
    proc = subprocess.Popen(cmd, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ready.exists(), f"driver not ready (exit {proc.poll()})"
        killed_at = time.monotonic()
        worker.raylet().kill()
        _, err = proc.communicate(timeout=NODE_LOSS_LIMIT_S)
        after = time.monotonic() - killed_at
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    print(f"[cluster] node watchdog: driver exited {proc.returncode} {after:.1f} s after the kill")
    assert proc.returncode == 3, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("[vlcal] node lost: ")]
    assert len(lines) == 1 and node_id in lines[0], err[-3000:]
