"""``vlcal train --config recipes/tiny_science.yaml``: one warm start, verl's GRPO per arm and seed, eval.

The phases and where they write (everything under ``--out``):

    data/, warm_start/           the demo's data and warm start (:mod:`vlcal_verl.demo`), made once;
                                 data/train-rlcr.parquet: the same rows prompted in the RLCR layout
    eval/warm_start/             ``vlcal eval`` of the warm start on the held-out items (+ image removed;
                                 ``science.evaluate_on: dev``: on a dev set of the training split)
    eval/warm_start-rlcr/        the same in RLCR's layout (``--protocol rlcr``; the RLCR baseline's start)
    rl/<arm>-seed<S>/            one verl run: verl/ (checkpoints), metrics/ (verl's file logger), logs/,
                                 rollouts/ (verl's generation dump + S̃_vis rows, :mod:`.rollouts`)
    eval/<arm>-seed<S>/          ``vlcal eval`` of that run's last checkpoint
    report.md, report.html, science.json, curves_*.png    (:mod:`.report`)

Each RL run is ``python -m vlcal_verl.main --recipe RECIPE ...`` in a child process (the demo's
``grpo_command`` / ``run_grpo``), from the same ``warm_start/`` and the same data order for both arms of a
seed. ``run.json`` records the recipe and overrides: a second call with the same ones and ``--resume``
skips what is done (a finished run, an existing evaluation) and lets verl resume an unfinished run from
its checkpoint; anything else is refused before work starts.

The RLCR baseline (``science.baseline: rlcr``) trains on ``data/train-rlcr.parquet`` (the same items in the
same order, each prompt asking for RLCR's layout) and is evaluated with ``vlcal eval --protocol rlcr``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vlcal_verl.demo.data import DEV, HELDOUT
from vlcal_verl.demo.evaluate import run_vlcal_eval
from vlcal_verl.demo.pipeline import (
    demo_config_of,
    grpo_command,
    latest_hf_checkpoint,
    prepare_assets,
    run_grpo,
)
from vlcal_verl.science.config import ScienceConfig

FULL = "full"
BASELINE = "baseline"
MANIFEST = "run.json"
RLCR_TRAIN = "train-rlcr.parquet"


def science_config_of(config: DictConfig) -> ScienceConfig:
    block = config.get("science")
    if block is None:
        raise ValueError("the recipe has no `science:` block (see recipes/tiny_science.yaml)")
    return ScienceConfig.from_dict(OmegaConf.to_container(block, resolve=True))


def arms(sc: ScienceConfig, data_dir: Path | None = None) -> dict[str, list[str]]:
    """Arm name → its extra overrides: the full method is the recipe as is (the default variant); the RLCR
    baseline also trains on the RLCR-prompted copy of the training rows in ``data_dir``."""
    if sc.baseline == "none":
        return {FULL: []}
    baseline = [f"ablation={sc.baseline}"]
    if sc.baseline == "rlcr" and data_dir is not None:
        baseline.append(f"data.train_files={data_dir / RLCR_TRAIN}")
    return {FULL: [], BASELINE: baseline}


def arm_protocol(arm: str, sc: ScienceConfig) -> str:
    """The output protocol an arm's model writes (what its evaluation parses)."""
    return "rlcr" if arm == BASELINE and sc.baseline == "rlcr" else "decoupled"


def write_protocol_copy(src: Path, dst: Path, protocol: str) -> Path:
    """``dst``: the rows of ``src`` with each prompt rebuilt for ``protocol`` from the row's question
    (images, answers, uids and order unchanged); an existing ``dst`` is kept (``--resume``)."""
    from vlcal_verl.data.schema import prompt_text, read_parquet, write_parquet

    if dst.exists():
        return dst
    rows = read_parquet(src)
    for r in rows:
        r["prompt"] = [
            {"role": "user", "content": prompt_text(r["extra_info"]["question"], protocol, len(r["images"]))}
        ]
    write_parquet(rows, dst)
    return dst


def run_seeds(base_seed: int, sc: ScienceConfig) -> list[int]:
    return [base_seed + i for i in range(sc.seeds)]


def arm_overrides(
    arm: str, seed: int, run_dir: Path, sc: ScienceConfig, data_dir: Path | None = None
) -> list[str]:
    """What one RL run adds to the recipe's overrides: its ablation (and the RLCR baseline's data), its
    folders, its seed (data order, rollout sampling, VCE masks — shared by both arms of a seed)."""
    return [
        *arms(sc, data_dir)[arm],
        f"trainer.default_local_dir={run_dir / 'verl'}",
        f"trainer.rollout_data_dir={run_dir / 'rollouts'}",
        f"trainer.experiment_name=science-{arm}-seed{seed}",
        f"data.seed={seed}",
        f"actor_rollout_ref.rollout.seed={seed}",
        f"vlcal.vce.seed={seed}",
    ]


def check_run_dir(out: Path, manifest: dict[str, Any], resume: bool) -> None:
    """Refuse to mix runs: a fresh run needs a folder without one (a folder holding only a complete
    ``warm_start/``, copied from a run of the same ``demo:`` settings, is accepted: the warm start is
    reused); ``--resume`` needs the same recipe, overrides and seeds as the run it continues."""
    path = out / MANIFEST
    if not path.exists():
        if resume:
            raise ValueError(f"--resume: nothing to resume, no {MANIFEST} in {out}; drop --resume")
        found = {p.name for p in out.iterdir()} if out.exists() else set()
        if found - {"warm_start"}:
            raise ValueError(f"{out} is not empty and holds no science run: give a new --out")
        if found and not (out / "warm_start" / "config.json").exists():
            raise ValueError(f"{out / 'warm_start'} is not a complete warm start (no config.json)")
        return
    if not resume:
        raise ValueError(f"{out} already holds a science run ({MANIFEST}): pass --resume or a new --out")
    old = json.loads(path.read_text(encoding="utf-8"))
    if old != manifest:
        diff = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
        raise ValueError(
            f"--resume: {out} was started with other settings ({', '.join(diff)}); give a new --out"
        )


def _phase(name: str, timings: dict[str, float], fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` as one phase, with a progress line before and after (seconds)."""
    print(f"[science] {name} ...", flush=True)
    t = time.perf_counter()
    result = fn(*args)
    timings[name] = time.perf_counter() - t
    print(f"[science] {name}: done in {timings[name]:.0f} s", flush=True)
    return result


def run_finished(run_dir: Path, total_steps: int) -> bool:
    marker = run_dir / "verl" / "latest_checkpointed_iteration.txt"
    return marker.exists() and int(marker.read_text().strip()) >= total_steps


def rl_run(recipe: Path, overrides: list[str], run_dir: Path, total_steps: int) -> Path:
    """verl's GRPO for one arm and seed (skipped when already finished); its last HF checkpoint."""
    if not run_finished(run_dir, total_steps):
        run_grpo(grpo_command(recipe, overrides, run_dir), run_dir)
    trained = latest_hf_checkpoint(run_dir / "verl")
    if trained is None:
        raise RuntimeError(f"no HF checkpoint under {run_dir / 'verl'} (save_contents needs hf_model)")
    return trained


def evaluate_once(
    dc,
    config: DictConfig,
    model: Path,
    out: Path,
    *,
    data_dir: Path,
    protocol: str = "decoupled",
    bench: str = "easy-vqa-heldout",
) -> None:
    """``vlcal eval --protocol PROTOCOL`` of one model on ``bench`` (the held-out items, or a dev set) and
    their image-removed twins into ``out``, unless a complete report is already there."""
    if (out / "metrics.json").exists() and (out / "generations.jsonl").exists():
        print(f"[science] reusing the evaluation in {out}", flush=True)
        return
    max_new = int(config.data.max_response_length)  # the training response length: no cut-off tags
    benches = [bench, f"{bench}-unanswerable"]
    run_vlcal_eval(model, data_dir, benches, out, max_new_tokens=max_new, cfg=dc, protocol=protocol)


def prepare_data(dc, sc: ScienceConfig, out: Path) -> tuple[Path, Path]:
    """Data and the one warm start (``prepare_assets``); with ``science.evaluate_on: dev`` the test split is
    not read (no held-out files) and the dev pair is written instead (:func:`~vlcal_verl.demo.data.
    load_dev_data`: ``demo.eval_size`` training-split items after the training items, images unseen)."""
    from vlcal_verl.demo.data import load_dev_data, write_demo_parquets

    if sc.evaluate_on != "dev":
        return prepare_assets(dc, out, {})
    warm, data_dir = prepare_assets(dataclasses.replace(dc, eval_size=0), out, {})
    dev = load_dev_data(dc.train_size, dc.eval_size, dc.seed, dc.image_size)
    write_demo_parquets(dataclasses.replace(dev, train=[]), data_dir, eval_name=DEV)
    return warm, data_dir


def check_arms(recipe: Path, overrides: list[str], sc: ScienceConfig) -> None:
    """Each arm's ``vlcal:`` block as its verl run will see it, validated before any work: an override that
    one arm cannot take (``vlcal.reward.w_vis=2`` with the RLCR baseline, which has no c_v) fails here, in
    one line naming the arm, not after the other arm has trained."""
    from vlcal_verl.main import vlcal_config
    from vlcal_verl.main_args import compose_recipe

    for arm, extra in arms(sc).items():
        try:
            vlcal_config(compose_recipe(recipe, [*overrides, *extra]))
        except ValueError as err:
            raise ValueError(f"the {arm} arm ({' '.join(extra) or 'the recipe as is'}): {err}") from None


def check_baseline(dc, sc: ScienceConfig) -> None:
    """The RLCR baseline needs a warm start that writes RLCR's layout too (else it starts unparsed)."""
    if sc.baseline == "rlcr" and dc.warm_start_rlcr_fraction <= 0:
        raise ValueError(
            "science.baseline=rlcr needs demo.warm_start_rlcr_fraction > 0 (a warm start that also writes "
            "the RLCR layout); or set science.baseline=decoupled"
        )


def run_science(
    recipe: Path, out: Path, overrides: list[str], seeds: int | None = None, resume: bool = False
) -> dict[str, Any]:
    """The whole science run; returns the report's content (:func:`vlcal_verl.science.report.build`)."""
    from vlcal_verl.main import compose_recipe
    from vlcal_verl.science.report import write_report

    t0 = time.perf_counter()
    out, recipe = out.resolve(), Path(recipe).resolve()
    overrides = [f"demo.dir={out}", *overrides, *([f"science.seeds={seeds}"] if seeds is not None else [])]
    config = compose_recipe(recipe, overrides)  # a bad key or value fails here, before any work
    dc, sc = demo_config_of(config), science_config_of(config)
    if not dc.eval_size:
        raise ValueError("demo.eval_size must be > 0 in a science run (it evaluates held-out or dev items)")
    check_baseline(dc, sc)
    check_arms(recipe, overrides, sc)
    total = int(config.trainer.total_training_steps)
    manifest = {"recipe": str(recipe), "overrides": overrides}
    check_run_dir(out, manifest, resume)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    timings: dict[str, float] = {}
    warm, data_dir = _phase("data and warm start", timings, prepare_data, dc, sc, out)
    if sc.baseline == "rlcr":
        write_protocol_copy(data_dir / "train.parquet", data_dir / RLCR_TRAIN, "rlcr")
    seeds_run = run_seeds(dc.seed, sc)
    bench = DEV if sc.evaluate_on == "dev" else HELDOUT
    evaluate_phase = functools.partial(evaluate_once, dc, config, data_dir=data_dir, bench=bench)
    # verl builds its validation set at start-up (never run: test_freq -1) from data.val_files
    val = [f"data.val_files={data_dir / f'{DEV}.parquet'}"] if sc.evaluate_on == "dev" else []
    _phase("eval warm start", timings, evaluate_phase, warm, out / "eval" / "warm_start")
    if sc.baseline == "rlcr":
        rlcr_eval = functools.partial(evaluate_phase, protocol="rlcr")
        _phase("eval warm start (rlcr)", timings, rlcr_eval, warm, out / "eval" / "warm_start-rlcr")
    for seed in seeds_run:
        for arm in arms(sc, data_dir):
            name = f"{arm}-seed{seed}"
            run_dir = out / "rl" / name
            run_overrides = [*overrides, *val, *arm_overrides(arm, seed, run_dir, sc, data_dir)]
            trained = _phase(f"RL {name}", timings, rl_run, recipe, run_overrides, run_dir, total)
            arm_eval = functools.partial(evaluate_phase, protocol=arm_protocol(arm, sc))
            _phase(f"eval {name}", timings, arm_eval, trained, out / "eval" / name)
    timings["total_s"] = time.perf_counter() - t0  # before the report, which prints them
    return _phase("report", timings, write_report, out, sc, seeds_run, timings)
