"""The local engine: one process runs VL-Calibration's GRPO step end to end (DESIGN.md §6).

Per RL step (the verl path's order, DESIGN.md §5)::

    rollout    HF generate, n per prompt                       (rollout.py)
    reward     I, F, Brier per sample                          (rewards.score_many, grading pool)
    vce        masked forward → KL_t, H_t on vision spans → S̃  (vce.py), R += w_vis·visual term
    adv        GRPO                                            (verl core_algos.compute_grpo_outcome_advantage)
    tar        reweight negative advantages on vision tokens   (tar.apply_tar)
    update     PPO-clip (+ low-var KL to the reference)        (verl core_algos policy loss, kl_penalty, agg_loss)

Only the driver is local: the algorithm is the shared modules and verl's ``core_algos`` (looked up on
the module at call time, so a patched function is the one that runs). The RL step's rollouts are seeded
by (seed, step) and its prompts by a seeded data order, which with the checkpoint's RNG states makes
``--resume`` exact.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from vlcal_verl.local import algo
from vlcal_verl.local.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    load_weights,
    save_checkpoint,
    save_weights,
)
from vlcal_verl.local.config import TrainConfig
from vlcal_verl.local.data import DemoData, load_demo_data, user_message
from vlcal_verl.local.evaluate import answer_kind
from vlcal_verl.local.rollout import encode_prompts, generate
from vlcal_verl.local.tracking import MetricLogger
from vlcal_verl.local.warm_start import warm_start


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def data_order(n_items: int, seed: int, step: int, per_step: int) -> list[int]:
    """Item indices of RL step ``step`` (1-based): epochs of seeded permutations, a pure function of step."""
    out = []
    for j in range(per_step):
        flat = (step - 1) * per_step + j
        epoch, pos = divmod(flat, n_items)
        out.append(int(np.random.default_rng([seed, epoch]).permutation(n_items)[pos]))
    return out


class LocalEngine:
    """Build model, data and optimiser; run warm start → eval → GRPO steps → eval → report."""

    def __init__(
        self, cfg: TrainConfig, out_dir: str | Path, resume: bool = False, data: DemoData | None = None
    ):
        self.cfg, self.lc, self.vc = cfg, cfg.local, cfg.vlcal
        self.out = Path(out_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self.resume = resume
        self._data = data
        self.history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        from vlcal_verl.grading import Grader
        from vlcal_verl.testing.tiny_models import load_tiny_vlm

        lc = self.lc
        if lc.num_threads:
            torch.set_num_threads(lc.num_threads)
        if lc.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        seed_everything(lc.seed)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.json").write_text(json.dumps(self.cfg.to_dict(), indent=2), encoding="utf-8")
        self.data = self._data or load_demo_data(lc.train_size, lc.eval_size, lc.seed, lc.image_size)
        self.model, self.processor = load_tiny_vlm(lc.model_family, seed=lc.seed)
        self.model.eval()
        self.ref = None
        self.grader = Grader(timeout_s=self.vc.reward.grading_timeout_s)
        self.actor_cfg = algo.actor_config(lc)

    def _new_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.model.parameters(), lr=self.lc.lr, weight_decay=self.lc.weight_decay)

    # ------------------------------------------------------------------ phases
    def run(self) -> dict[str, Any]:
        """The whole demo; returns {'before': row, 'after': row, 'table': str, 'timings': {...}}."""
        from vlcal_verl.local import report

        t0 = time.perf_counter()
        self.setup()
        ckpt = latest_checkpoint(self.ckpt_dir) if self.resume else None
        start_step = 0
        if ckpt is None:
            self.logger = MetricLogger(self.out, self.lc.tensorboard)
            self._warm_start_phase()
            self.optimizer = self._new_optimizer()
        else:
            load_weights(self.ckpt_dir / "warm_start.pt", self.model)
            self._load_reference()
            self.optimizer = self._new_optimizer()
            state = load_checkpoint(ckpt, self.model, self.optimizer)
            start_step = int(state["step"])
            self.logger = MetricLogger(self.out, self.lc.tensorboard, resume_step=start_step)
            print(f"resumed from {ckpt} (step {start_step})", flush=True)
        t_ws = time.perf_counter()
        before = (
            report.evaluate_phase(self, "after_warm_start") if self.lc.evaluate and ckpt is None else None
        )
        t_ev = time.perf_counter()
        self._rl_phase(start_step)
        t_rl = time.perf_counter()
        result = report.final_report(self, before) if self.lc.evaluate else {}
        timings = {
            "setup_and_warm_start_s": t_ws - t0,
            "eval_before_s": t_ev - t_ws,
            "rl_s": t_rl - t_ev,
            "eval_after_and_report_s": time.perf_counter() - t_rl,
            "total_s": time.perf_counter() - t0,
        }
        result["timings"] = timings
        (self.out / "timings.json").write_text(json.dumps(timings, indent=2), encoding="utf-8")
        self.logger.close()
        self.grader.close()
        return result

    def _warm_start_phase(self) -> None:
        lc = self.lc
        losses = warm_start(
            self.model,
            self.processor,
            self.data.train,
            steps=lc.warm_start_steps,
            batch_size=lc.warm_start_batch_size,
            lr=lc.warm_start_lr,
            weight_decay=0.0,
            grad_clip=lc.grad_clip,
            seed=lc.seed,
            log=lambda m, s: self.logger.log(m, s, phase="warm_start"),
        )
        if losses:
            print(f"warm start: loss {losses[0]:.3f} -> {losses[-1]:.3f} in {len(losses)} steps", flush=True)
        save_weights(self.ckpt_dir / "warm_start.pt", self.model)
        self._load_reference()

    def _load_reference(self) -> None:
        """Frozen copy of the warm-started policy for the KL loss (only when ``kl_coef > 0``)."""
        if self.lc.kl_coef <= 0:
            return
        import copy

        self.ref = copy.deepcopy(self.model).eval()
        for p in self.ref.parameters():
            p.requires_grad_(False)

    def _rl_phase(self, start_step: int) -> None:
        lc = self.lc
        bar = tqdm(
            range(start_step + 1, lc.rl_steps + 1),
            desc="GRPO",
            unit="step",
            initial=start_step,
            total=lc.rl_steps,
        )
        for step in bar:
            metrics = self.rl_step(step)
            self.logger.log(metrics, step, phase="rl", echo=True)
            if (lc.checkpoint_every and step % lc.checkpoint_every == 0) or step == lc.rl_steps:
                save_checkpoint(self.ckpt_dir, step, self.model, self.optimizer, {"data_seed": lc.seed})

    # ------------------------------------------------------------------ one GRPO step
    def rollout_batch(self, step: int):
        """Prompts of ``step`` repeated n times, and their sampled responses."""
        lc = self.lc
        idx = data_order(len(self.data.train), lc.seed, step, lc.prompts_per_step)
        items = [self.data.train[i] for i in idx for _ in range(lc.n_rollouts)]
        group = np.array([g for g in range(len(idx)) for _ in range(lc.n_rollouts)])
        prompt = encode_prompts(
            self.processor, [user_message(it.question) for it in items], [it.image for it in items]
        )
        gen = torch.Generator().manual_seed(int(np.random.default_rng([lc.seed, step, 17]).integers(2**62)))
        ro = generate(
            self.model,
            self.processor,
            prompt,
            max_new_tokens=lc.max_new_tokens,
            temperature=lc.temperature,
            top_k=lc.top_k,
            generator=gen,
        )
        uids = [f"s{step}:{it.uid}:r{k % lc.n_rollouts}" for k, it in enumerate(items)]
        return items, group, uids, ro

    def rl_step(self, step: int) -> dict[str, float]:
        """One GRPO step; returns its metrics (rewards, VCE, advantages, TAR, loss)."""
        from vlcal_verl.rewards import score_many

        items, group, uids, ro = self.rollout_batch(step)
        scored = score_many(
            [(t, it.answer, answer_kind(it)) for t, it in zip(ro.texts, items, strict=True)],
            config=self.vc.reward,
            grader=self.grader,
        )
        scores = torch.tensor([s["score"] for s in scored], dtype=torch.float32)
        signals = algo.vce_signals(self.model, self.processor, ro, uids, self.vc)
        c_v = [s["vision_confidence"] for s in scored]
        if signals is not None and self.vc.reward.w_vis:
            scores = algo.add_visual(scores, c_v, signals["s_tilde"], self.vc.reward.w_vis)
        adv = algo.grpo_advantages(scores, ro.response_mask, group, self.lc.norm_adv_by_std)
        adv, tar_stats = algo.reweight(adv, signals, ro.response_mask, self.vc)
        loss_metrics = algo.policy_update(self, ro, adv)
        return algo.step_metrics(scored, scores, adv, ro, signals, tar_stats, loss_metrics)
