"""The examples in examples/ run as documented: each is executed (or, for cluster-only steps, dry-run and
composed/validated by verl itself) and its output checked against hand-computed values."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from vlcal_verl.testing.verl_loop import LOOP_TEST_TIMEOUT_S

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
BIN = Path(sys.executable).parent


def run(cmd: list[str], timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    full_env = {**os.environ, "PYTHONPATH": pythonpath, "HF_HUB_OFFLINE": "1", **env}
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


# ---- scoring and metrics from Python ----------------------------------------------------------------


def test_score_and_metrics_example(tmp_path):
    plot = tmp_path / "reliability.png"
    proc = run([sys.executable, str(EXAMPLES / "score_and_metrics.py"), "--plot", str(plot)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    # R = I + 2·(−(Φ − I)²) + 0.4·F, Φ = 2·c_v·c_r/(c_v + c_r)
    phi_unsure = 2 * 0.4 * 0.5 / 0.9
    want = [
        1.4,  # right, Φ = 1
        -2 * 0.81 + 0.4,  # wrong, Φ = 0.9
        1 - 2 * (phi_unsure - 1) ** 2 + 0.4,  # right, Φ = 0.444
        1 - 2 * (2 * 0.8 * 0.6 / 1.4 - 1) ** 2 + 0.4,  # 1/2 = 0.5, Φ = 0.686
        1 - 2 * (0.7 - 1) ** 2 + 0.4,  # letter B, Φ = 0.7
        1 - 2.0,  # right answer, no confidence tags: Brier −1, F = 0
    ]
    assert out["scores"] == pytest.approx(want, abs=1e-9)
    m = out["metrics"]
    assert m["n"] == 6 and m["accuracy"] == pytest.approx(5 / 6) and m["parse_rate"] == pytest.approx(5 / 6)
    conf = [1.0, 0.9, phi_unsure, 2 * 0.8 * 0.6 / 1.4, 0.7, 0.0]
    correct = [1, 0, 1, 1, 1, 1]
    assert m["brier"] == pytest.approx(sum((c - y) ** 2 for c, y in zip(conf, correct, strict=True)) / 6)
    assert m["mean_conf_wrong"] == pytest.approx(0.9)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- a cluster launch for the 8B recipe -------------------------------------------------------------


def test_cluster_example_names_a_real_recipe_and_dry_runs():
    script = EXAMPLES / "cluster_8b.sh"
    assert run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    recipe = next(w.strip('"') for w in text.split() if w.startswith('recipe="'))[len('recipe="') :]
    assert (REPO / recipe).is_file() and recipe == "recipes/qwen3_vl_8b.yaml"
    proc = run(
        ["bash", str(script), "ablation=vce_kl"],
        DRY_RUN="1",
        SUBMISSION_ID="sid-1",
        RAY_ADDRESS="http://head:8265",
        VLCAL_PYTHON=sys.executable,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("ray job submit --address http://head:8265 ")
    assert lines[0].endswith("-- python -m vlcal_verl.main --check --recipe recipes/qwen3_vl_8b.yaml ")
    assert "--submission-id sid-1 --no-wait" in lines[1]
    assert lines[1].endswith(
        "-- python -m vlcal_verl.main --recipe recipes/qwen3_vl_8b.yaml "
        "trainer.experiment_name=qwen3_vl_8b_full ablation=vce_kl "
    )
    assert lines[2].split() == ["ray", "job", "logs", "--address", "http://head:8265", "--follow", "sid-1"]
    assert lines[3].split() == ["ray", "job", "status", "--address", "http://head:8265", "sid-1"]


# ---- evaluating a checkpoint (offline: the tiny random model) ---------------------------------------


def test_eval_example_writes_a_report(tmp_path):
    out = tmp_path / "report"
    proc = run(
        ["bash", str(EXAMPLES / "eval_checkpoint.sh")],
        timeout=600,
        LIMIT="2",
        OUT=str(out),
        VLCAL=str(BIN / "vlcal"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    generations = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(generations) == 4  # 2 items of easy-vqa and their 2 image-removed copies
    assert sorted(g["unanswerable"] for g in generations) == [False, False, True, True]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["overall"]["n"] == 2 and set(metrics["per_benchmark"]) == {"easy-vqa"}
    assert (out / "report.md").is_file() and (out / "reliability.png").is_file()


# ---- plain verl GRPO scored by the reward server ------------------------------------------------------

CHECK = """
import sys
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
name, folder = sys.argv[1], sys.argv[2]
overrides = ["hydra.searchpath=[pkg://verl.trainer.config]", *sys.argv[3:]]
with initialize_config_dir(config_dir=folder, version_base=None):
    cfg = compose(config_name=name, overrides=overrides)
from verl.trainer.ppo.reward import get_custom_reward_fn
from verl.trainer.ppo.utils import need_critic, need_reference_policy
from verl.trainer.ppo.v1 import get_trainer_cls
from verl.utils.config import validate_config
from verl.utils.device import auto_set_device
auto_set_device(cfg)
validate_config(config=cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
from reward_server.client import ClientOptions, compute_score
opts = ClientOptions.from_kwargs(dict(cfg.reward.custom_reward_function.reward_kwargs))
fn = get_custom_reward_fn(cfg)
trainer = get_trainer_cls(cfg.trainer.v1.trainer_mode)
print("RESULT", cfg.trainer.device, cfg.actor_rollout_ref.rollout.name, cfg.algorithm.adv_estimator,
      trainer.__module__, compute_score in getattr(fn, "args", ()), opts.server_url)
"""


@pytest.mark.parametrize(
    ("name", "env", "device", "rollout"),
    [
        ("grpo", {}, "cuda", "vllm"),
        ("grpo_cpu", {"VERL_PLATFORM": "cpu", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}, "cpu", "hf"),
    ],
)
def test_verl_reward_server_config_passes_verls_own_checks(name, env, device, rollout):
    """What verl's main_ppo checks before Ray starts, on the example configs, in a fresh process."""
    folder = EXAMPLES / "verl_reward_server"
    extra = ["actor_rollout_ref.model.path=/models/tiny"] if name == "grpo_cpu" else []
    proc = run(
        [sys.executable, "-c", CHECK, name, str(folder), *extra],
        VLCAL_REWARD_SERVER_URL="http://rm:9000",
        **env,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "[validate_config] All configuration checks passed successfully!" in proc.stdout
    result = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT"))
    got_device, got_rollout, adv, trainer_module, is_client, url = result.split()[1:]
    assert (got_device, got_rollout, adv) == (device, rollout, "grpo")
    assert trainer_module.startswith("verl.") and "vlcal" not in trainer_module  # verl's own trainer
    assert is_client == "True" and url == "http://rm:9000"
    assert run(["bash", "-n", str(folder / "run.sh")]).returncode == 0


PROBE = """
import sys
import torch.distributed as dist
from verl.utils.distributed import initialize_global_process_group_ray
from vlcal_verl.verl_ext.cpu_backend.process_group import ray_worker_process_setup
if sys.argv[1] == "hook":
    ray_worker_process_setup()
initialize_global_process_group_ray(timeout_second=None)  # verl's call, verl's default backend string
print("backend", dist.get_backend())
"""


def _probe(with_hook: bool) -> subprocess.CompletedProcess:
    env = {"VERL_PLATFORM": "cpu", "WG_BACKEND": "ray", "RANK": "0", "WORLD_SIZE": "1"}
    port = str(_free_port())
    return run([sys.executable, "-c", PROBE, "hook" if with_hook else "bare"], MASTER_ADDR="127.0.0.1",
               MASTER_PORT=port, **env)  # fmt: skip


def test_stock_verl_process_group_needs_the_setup_hook_on_cpu():
    """verl 0.9.1's own call fails on the CPU platform ('cpu:gloo,cpu:gloo'); after the Ray setup hook
    the same call goes through and the rank's group is gloo."""
    bare = _probe(with_hook=False)
    assert bare.returncode != 0 and "Duplicate device type cpu" in bare.stderr, bare.stderr[-2000:]
    hooked = _probe(with_hook=True)
    assert hooked.returncode == 0, hooked.stderr[-3000:]
    assert "backend gloo" in hooked.stdout


def test_setup_hook_acts_only_in_cpu_worker_group_ranks():
    from vlcal_verl.verl_ext.cpu_backend.process_group import is_worker_group_rank

    rank = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    assert is_worker_group_rank({"VERL_PLATFORM": "cpu", "WG_BACKEND": "ray", **rank})
    assert is_worker_group_rank({"VERL_PLATFORM": " CPU ", "WG_BACKEND": "ray", **rank})
    assert not is_worker_group_rank({"VERL_PLATFORM": "cuda", "WG_BACKEND": "ray", **rank})  # GPU: verl's own
    assert not is_worker_group_rank({"WG_BACKEND": "ray", **rank})
    assert not is_worker_group_rank({"VERL_PLATFORM": "cpu", **rank})  # TaskRunner, agent loop, servers
    no_port = {k: v for k, v in rank.items() if k != "MASTER_PORT"}
    assert not is_worker_group_rank({"VERL_PLATFORM": "cpu", "WG_BACKEND": "ray", **no_port})


def test_grpo_cpu_config_installs_the_setup_hook_and_eager_entropy():
    from omegaconf import OmegaConf

    from vlcal_verl.verl_ext.cpu_backend.process_group import HOOK, ray_worker_process_setup

    cfg = OmegaConf.load(EXAMPLES / "verl_reward_server" / "grpo_cpu.yaml")
    assert cfg.ray_kwargs.ray_init.runtime_env.worker_process_setup_hook == HOOK
    module, _, name = HOOK.rpartition(".")
    import importlib

    assert getattr(importlib.import_module(module), name) is ray_worker_process_setup
    for role in ("actor", "ref"):  # eager entropy on a CPU, as vlcal's own CPU device
        assert cfg.actor_rollout_ref[role].fsdp_config.use_torch_compile is False, role


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(LOOP_TEST_TIMEOUT_S)
def test_verl_reward_server_two_steps_on_cpu(tmp_path, small_demo_assets):
    """run.sh with grpo_cpu: the reward server plus two steps of verl's own GRPO loop, with verl's stock
    trainer and worker classes, on the CPU backend. Once the server has scored step 1's 8 rollouts (its
    /metrics, read while the run goes) the test kills it, answers the next connection on its port by
    closing it (a server mid-restart), then starts a new server there: step 2 is scored after the client's
    retries, by the new server, and the rewards verl trained on are the in-process reward of the same
    responses. The warm start has the small tokenizer: the subject here is the reward path."""
    from vlcal_verl.testing.ray_local import new_ray_temp_dir, stop_processes_under

    warm, data = small_demo_assets / "warm_start", small_demo_assets / "data"  # as `make demo` leaves them
    metrics, dump = tmp_path / "verl-metrics.jsonl", tmp_path / "dump"
    temp, port = new_ray_temp_dir(), _free_port()
    overrides = [
        f"actor_rollout_ref.model.path={warm}",
        f"data.train_files={data / 'train.parquet'}",
        f"data.val_files={data / 'easy-vqa-heldout.parquet'}",
        "data.train_batch_size=2",  # 2 prompts × 4 rollouts per step: CI time (one sequence group per rank)
        "actor_rollout_ref.actor.ppo_mini_batch_size=2",
        "data.max_response_length=48",
        f"trainer.default_local_dir={tmp_path / 'ckpt'}",
        f"trainer.rollout_data_dir={dump}",
        f"+ray_kwargs.ray_init._temp_dir={temp}",
        f"hydra.run.dir={tmp_path / 'hydra'}",
    ]
    cmd = ["bash", str(EXAMPLES / "verl_reward_server" / "run.sh"), *overrides]
    env = {"CONFIG": "grpo_cpu", "PYTHON": sys.executable, "RS_PORT": str(port), "RS_WORKERS": "1",
           "VERL_FILE_LOGGER_PATH": str(metrics)}  # fmt: skip
    restart = _ServerRestart(port, after_items=8)
    try:
        proc, scraped = _run_scraping(
            cmd, env, f"http://127.0.0.1:{port}/metrics", timeout=LOOP_TEST_TIMEOUT_S - 300,
            on_page=restart.on_page,
        )  # fmt: skip
    finally:
        stop_processes_under(temp)
        restart.stop()
    assert proc.returncode == 0, proc.output[-6000:]
    assert restart.refused == 1, "no reward request reached the port while the server was down"
    # step 2 rode out the restart: the client logged its retries, each naming the URL (refused, then 503
    # "not ready" while the new server warmed up)
    url = f"http://127.0.0.1:{port}"
    retries = [ln for ln in proc.output.splitlines() if url in ln and "retrying in" in ln]
    assert retries, proc.output[-4000:]
    steps = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    assert [s["step"] for s in steps] == [1, 2]
    # the scores verl trained on (its rollout dump, and the logged batch mean) are the in-process reward
    statuses: dict[int, Counter] = {1: Counter(), 2: Counter()}
    for s in steps:
        rows = [json.loads(line) for line in (dump / f"{s['step']}.jsonl").read_text().splitlines() if line]
        assert len(rows) == 8  # 2 prompts × 4 rollouts
        want = [_in_process_reward(r, data / "train.parquet") for r in rows]
        assert [r["score"] for r in rows] == pytest.approx([w["score"] for w in want], abs=1e-5)
        assert s["data"]["critic/score/mean"] == pytest.approx(sum(w["score"] for w in want) / 8, abs=1e-5)
        statuses[s["step"]].update('status="ok"' if w["parse_ok"] else 'status="parse_error"' for w in want)
    # each server's own count (/metrics): the old one scored step 1's 8 rollouts, the new one step 2's
    counted = {1: restart.last_page_before_kill, 2: scraped}
    for step, page in counted.items():
        assert _counter(page, "vlcal_rs_items_scored_total") == dict(statuses[step]), (step, page[-3000:])


class _ServerRestart:
    """Kill run.sh's reward server once its /metrics count ``after_items`` scored items, refuse the next
    connection to its port (accept, close: a server mid-restart), then start a new server on the port.
    Runs in a thread, so the scraping goes on; :meth:`stop` stops the new server and its workers."""

    def __init__(self, port: int, after_items: int):
        self.port, self.after_items = port, after_items
        self.last_page_before_kill, self.refused, self.server = "", 0, None
        self.thread = None

    def on_page(self, page: str) -> None:
        import threading

        if (
            self.thread is None
            and sum(_counter(page, "vlcal_rs_items_scored_total").values()) >= self.after_items
        ):
            self.last_page_before_kill = page
            self.thread = threading.Thread(target=self._restart, daemon=True)
            self.thread.start()

    def _restart(self) -> None:
        import socket

        import psutil

        for p in psutil.process_iter(["cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if "-m reward_server" in cmd and f"--port {self.port}" in cmd:
                for q in [*p.children(recursive=True), p]:
                    q.kill()
                psutil.wait_procs([p], timeout=30)
        with socket.create_server(("127.0.0.1", self.port), reuse_port=False) as listener:
            listener.settimeout(600)
            conn, _ = listener.accept()  # the client's first attempt of step 2
            conn.close()
            self.refused += 1
        self.server = subprocess.Popen(
            [sys.executable, "-m", "reward_server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def stop(self) -> None:
        import psutil

        if self.server is not None:
            procs = [
                *psutil.Process(self.server.pid).children(recursive=True),
                psutil.Process(self.server.pid),
            ]
            for q in procs:
                q.kill()
            psutil.wait_procs(procs, timeout=30)


def _run_scraping(cmd: list[str], env: dict, url: str, timeout: float, on_page=None):
    """Run ``cmd`` (as :func:`run` does) and fetch ``url`` every second while it runs, handing each page
    to ``on_page``; (result, last page)."""
    import threading
    import time
    import urllib.request
    from types import SimpleNamespace

    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    full_env = {**os.environ, "PYTHONPATH": pythonpath, "HF_HUB_OFFLINE": "1", **env}
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    chunks: list[str] = []
    reader = threading.Thread(target=lambda: chunks.extend(proc.stdout), daemon=True)
    reader.start()
    last, deadline = "", time.monotonic() + timeout
    while proc.poll() is None:
        if time.monotonic() > deadline:
            proc.kill()
            break
        try:
            with urllib.request.urlopen(url, timeout=2) as page:
                last = page.read().decode()
            if on_page is not None:
                on_page(last)
        except OSError:
            pass
        time.sleep(1)
    proc.wait()
    reader.join(timeout=10)
    return SimpleNamespace(returncode=proc.returncode, output="".join(chunks)), last


def _counter(page: str, name: str) -> dict[str, float]:
    """The samples of one Prometheus counter, {labels: value}."""
    out = {}
    for line in page.splitlines():
        if line.startswith(name + "{"):
            labels, value = line[len(name) + 1 :].rsplit("} ", 1)
            out[labels] = float(value)
    return out


def _in_process_reward(row: dict, train: Path) -> dict:
    """vlcal's in-process reward (the server's default settings) of one dumped rollout, with the
    extra_info (answer kind) of its training row, found by the question in the decoded prompt."""
    import dataclasses

    from reward_server.settings import ServerSettings
    from vlcal_verl.data.schema import read_parquet
    from vlcal_verl.rewards import compute_score

    matches = [r for r in read_parquet(train) if f"\n{r['extra_info']['question']}\n" in row["input"]]
    item = max(matches, key=lambda r: len(r["extra_info"]["question"]))
    kwargs = dataclasses.asdict(ServerSettings().reward_config())
    return compute_score(item["data_source"], row["output"], row["gts"], item["extra_info"], **kwargs)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
