"""The algorithm calls of one local GRPO step, each a thin adapter over a shared module or verl.

Nothing here re-implements the method: VCE and TAR come from ``vlcal_verl.vce`` / ``vlcal_verl.tar``,
the visual reward term from ``vlcal_verl.rewards.add_visual_term``, GRPO advantages, the PPO-clip loss,
the KL estimator and the loss aggregation from verl 0.9.1's ``core_algos``. verl functions are looked up
on the ``core_algos`` module (and its policy-loss registry) at call time, so tests can patch them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from vlcal_verl.local.rollout import Rollouts, response_logits, response_logprobs, token_logprobs


def actor_config(lc) -> Any:
    """verl's ``ActorConfig`` carrying the clip ratio and loss aggregation the policy loss reads."""
    from verl.workers.config import ActorConfig

    return ActorConfig(
        strategy="fsdp",
        ppo_micro_batch_size_per_gpu=lc.prompts_per_step * lc.n_rollouts,
        ppo_mini_batch_size=lc.prompts_per_step * lc.n_rollouts,
        rollout_n=lc.n_rollouts,
        clip_ratio=lc.clip_ratio,
        clip_ratio_low=lc.clip_ratio,
        clip_ratio_high=lc.clip_ratio,
        loss_agg_mode=lc.loss_agg_mode,
        use_kl_loss=lc.kl_coef > 0,
        kl_loss_coef=lc.kl_coef,
        kl_loss_type=lc.kl_type,
        use_torch_compile=False,
    )


# ---------------------------------------------------------------------------------- VCE and TAR
def vision_spans(ro: Rollouts, tokenizer) -> list[tuple[int, int] | None]:
    """Vision token span [start, end) of each response (``spans.vision_token_spans``), None if absent."""
    from vlcal_verl.spans import vision_token_spans

    lengths = ro.response_mask.sum(-1).tolist()
    return vision_token_spans(
        [r[: int(n)].tolist() for r, n in zip(ro.responses, lengths, strict=True)], tokenizer
    )


@torch.no_grad()
def vce_signals(model, processor, ro: Rollouts, uids: list[str], vc) -> dict[str, Any] | None:
    """KL_t, H_t [B, L], the span mask [B, L], K̄, H̄, S and S̃_vis [B] (NaN without a span); None if VCE is off."""
    if not vc.vce.enabled:
        return None
    from vlcal_verl import vce
    from vlcal_verl.local.rollout import full_inputs

    spans = vision_spans(ro, processor.tokenizer)
    batch = {
        **full_inputs(ro.prompt, ro.responses, ro.response_mask),
        "responses": ro.responses,
        "response_mask": ro.response_mask,
        "uid": uids,
    }
    sig = vce.compute_vce_signals(model, batch, spans, vc.vce, processor=processor)
    kl, entropy, span_mask = sig.kl, sig.entropy, sig.span_mask
    k_bar, h_bar, s = vce.visual_certainty(kl, entropy, span_mask, vc.vce)
    return {
        "kl": kl,
        "entropy": entropy,
        "span_mask": span_mask,
        "k_bar": k_bar,
        "h_bar": h_bar,
        "s": s,
        "s_tilde": vce.normalize_visual_certainty(s),
        "spans": spans,
    }


def add_visual(
    scores: torch.Tensor, c_v: list[float | None], s_tilde: torch.Tensor, w_vis: float
) -> torch.Tensor:
    """R ← R + w_vis·(−(c_v − S̃_vis)²) (``rewards.add_visual_term``)."""
    from vlcal_verl.rewards import add_visual_term

    return add_visual_term(scores, c_v, s_tilde, w_vis)


def reweight(
    adv: torch.Tensor, signals: dict | None, response_mask: torch.Tensor, vc
) -> tuple[torch.Tensor, dict]:
    """TAR on negative advantages of vision tokens (``tar.apply_tar``); identity when TAR is off."""
    if signals is None or not vc.tar.enabled:
        return adv, {}
    from vlcal_verl import tar

    return tar.apply_tar(adv, signals["kl"], signals["entropy"], signals["span_mask"], response_mask, vc.tar)


# ---------------------------------------------------------------------------------- verl core_algos
def grpo_advantages(scores: torch.Tensor, response_mask: torch.Tensor, group: np.ndarray, norm_by_std: bool):
    """Outcome reward at each response's last token → verl's GRPO advantages [B, L]."""
    from verl.trainer.ppo import core_algos

    token_rewards = torch.zeros(response_mask.shape, dtype=torch.float32)
    last = (response_mask.sum(-1) - 1).clamp(min=0)
    token_rewards[torch.arange(len(scores)), last] = scores.float()
    adv, _ = core_algos.compute_grpo_outcome_advantage(
        token_level_rewards=token_rewards,
        response_mask=response_mask.float(),
        index=group,
        norm_adv_by_std_in_grpo=norm_by_std,
    )
    return adv


def policy_update(engine, ro: Rollouts, adv: torch.Tensor) -> dict[str, float]:
    """PPO-clip (verl policy loss) + optional low-var KL to the reference; one AdamW step.

    With one PPO epoch on one mini-batch the behaviour policy is the current one, so the old
    log-probabilities are this forward's, detached (what verl's separate old-log-prob pass returns).
    """
    from verl.trainer.ppo import core_algos

    lc, model = engine.lc, engine.model
    mask = ro.response_mask.float()
    model.train()
    logits = response_logits(model, ro.prompt, ro.responses, ro.response_mask)
    log_prob = token_logprobs(logits, ro.responses)
    del logits
    old_log_prob = log_prob.detach()
    loss_fn = core_algos.get_policy_loss_fn(engine.actor_cfg.policy_loss.loss_mode)
    pg_loss, pg_metrics = loss_fn(
        old_log_prob=old_log_prob,
        log_prob=log_prob,
        advantages=adv,
        response_mask=mask,
        loss_agg_mode=lc.loss_agg_mode,
        config=engine.actor_cfg,
    )
    loss = pg_loss
    metrics = {"actor/pg_loss": float(pg_loss.detach()), **{k: float(v) for k, v in pg_metrics.items()}}
    if engine.ref is not None and lc.kl_coef > 0:
        with torch.no_grad():
            ref_log_prob = response_logprobs(engine.ref, ro.prompt, ro.responses, ro.response_mask)
        kld = core_algos.kl_penalty(log_prob, ref_log_prob, lc.kl_type)
        kl_loss = core_algos.agg_loss(loss_mat=kld, loss_mask=mask, loss_agg_mode=lc.loss_agg_mode)
        loss = loss + lc.kl_coef * kl_loss
        metrics["actor/kl_loss"] = float(kl_loss.detach())
    engine.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), lc.grad_clip)
    engine.optimizer.step()
    model.eval()
    metrics["actor/loss"] = float(loss.detach())
    metrics["actor/grad_norm"] = float(grad_norm)
    metrics["actor/entropy_proxy"] = float(-(old_log_prob * mask).sum() / mask.sum())
    return metrics


# ---------------------------------------------------------------------------------- metrics
def _mean(values: list[Any]) -> float:
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(vals) / len(vals) if vals else float("nan")


def step_metrics(scored, scores, adv, ro: Rollouts, signals, tar_stats, loss_metrics) -> dict[str, float]:
    """Flat per-step metrics: reward components, S̃_vis stats, advantage and TAR stats, loss."""
    mask = ro.response_mask.bool()
    seq_adv = adv[torch.arange(adv.shape[0]), (ro.response_mask.sum(-1) - 1).clamp(min=0)]
    m: dict[str, float] = {
        "reward/mean": float(scores.mean()),
        "reward/std": float(scores.std()) if len(scores) > 1 else 0.0,
        "reward/accuracy": _mean([s["accuracy"] for s in scored]),
        "reward/format": _mean([s["format"] for s in scored]),
        "reward/brier": _mean([s["brier"] for s in scored]),
        "reward/parse_ok": _mean([float(bool(s["parse_ok"])) for s in scored]),
        "reward/confidence": _mean([s["confidence"] for s in scored]),
        "reward/vision_confidence": _mean([s["vision_confidence"] for s in scored]),
        "reward/reasoning_confidence": _mean([s["reasoning_confidence"] for s in scored]),
        "adv/nonzero_frac": float((seq_adv.abs() > 1e-6).float().mean()),
        "adv/abs_mean": float(adv[mask].abs().mean()) if mask.any() else 0.0,
        "response/length": float(ro.response_mask.sum(-1).float().mean()),
    }
    if signals is not None:
        st = signals["s_tilde"]
        valid = ~torch.isnan(st)
        m["vce/span_frac"] = float(valid.float().mean())
        m["vce/s_vis_mean"] = float(st[valid].mean()) if valid.any() else float("nan")
        m["vce/s_vis_std"] = float(st[valid].std()) if valid.sum() > 1 else float("nan")
        m["vce/kl_bar_mean"] = _mean(signals["k_bar"].tolist())
        m["vce/h_bar_mean"] = _mean(signals["h_bar"].tolist())
    for k, v in (tar_stats or {}).items():
        m[k if "/" in k else f"tar/{k}"] = float(v)
    m.update(loss_metrics)
    return m
