"""Supervised warm start on protocol-formatted targets (see ``data.py`` for what the targets teach).

Teacher forcing on ``prompt ⊕ target ⊕ <|im_end|>`` (the prompt exactly as verl builds it from the parquet
row): cross-entropy on the target tokens only, AdamW,
gradient clipping, a learning rate decaying linearly to 10% (the phase is about a hundred steps). Batches are
drawn in a seeded order, so the phase is reproducible; its output is the RL phase's initial policy and
verl's reference policy (``warm_started_model`` saves it as an HF folder that verl loads).

With ``rlcr_fraction`` > 0 that share of the items is taught in the RLCR baseline's layout, each with the
prompt the RLCR run gives it (``ablation=rlcr``: one ``<confidence>``), the rest in the decoupled one: one
model then starts both arms of the science run, each in its own protocol. 0 (the default) gives exactly
the decoupled-only targets and batches of before.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from vlcal_verl.demo.data import image_facts, rlcr_target, user_message, warm_start_target
from vlcal_verl.evaluation.hf_generate import encode_prompts, response_logprobs, special_ids


def target_batch(tokenizer, targets: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise targets (+ <|im_end|>) → (ids, mask) [batch, target_len], right-padded."""
    eos, pad, _ = special_ids(tokenizer)
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] + [eos] for t in targets]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def is_rlcr(index: int, fraction: float) -> bool:
    """Item ``index`` is taught in the RLCR layout: every item where floor((i+1)·f) steps up, so exactly
    floor(n·f) of the first n items are RLCR, spread evenly over the (already shuffled) items."""
    return int((index + 1) * fraction) > int(index * fraction)


def build_targets(items: list[Any], seed: int, rlcr_fraction: float = 0.0) -> list[tuple[Any, str, str]]:
    """(item, target text, protocol) for every item; confidences drawn from a per-item seeded RNG."""
    out = []
    for i, item in enumerate(items):
        rng = random.Random(f"{seed}:{i}:{item.uid}")
        facts = image_facts(item.image)
        if is_rlcr(i, rlcr_fraction):
            out.append((item, rlcr_target(item.question, item.answer, facts, rng), "rlcr"))
        else:
            out.append((item, warm_start_target(item.question, item.answer, facts, rng), "decoupled"))
    return out


def warm_start(
    model,
    processor,
    items: list[Any],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    grad_clip: float,
    seed: int,
    rlcr_fraction: float = 0.0,
    log=None,
) -> list[float]:
    """Run ``steps`` supervised steps in place on ``model``; return the per-step losses."""
    if steps <= 0:
        return []
    pairs = build_targets(items, seed, rlcr_fraction)
    order = random.Random(seed).sample(range(len(pairs)), len(pairs))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    # linear decay to 10% of lr: the last steps settle the template instead of bouncing around it
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 - 0.9 * k / max(steps - 1, 1))
    model.train()
    losses: list[float] = []
    for step in tqdm(range(steps), desc="warm start", unit="step"):
        idx = [order[(step * batch_size + j) % len(order)] for j in range(batch_size)]
        batch = [pairs[i] for i in idx]
        prompt = encode_prompts(
            processor, [user_message(it.question, p) for it, _, p in batch], [it.image for it, _, _ in batch]
        )
        ids, mask = target_batch(processor.tokenizer, [t for _, t, _ in batch])
        logp = response_logprobs(model, prompt, ids, mask)
        loss = -(logp * mask).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if log is not None:
            log({"warm_start/loss": losses[-1]}, step)
    model.eval()
    return losses


def warm_started_model(cfg: Any, items: list[Any], out_dir: Path) -> Path:
    """Build the tiny model, warm start it on ``items`` and save it (weights + processor) to ``out_dir``.

    ``cfg`` is the :class:`vlcal_verl.demo.config.DemoConfig`. An existing complete folder is reused
    (``vlcal train --resume``); the folder is written under a temporary name and renamed when complete.
    """
    from vlcal_verl.testing.tiny_models import load_tiny_vlm

    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists() and (out_dir / "processor_config.json").exists():
        print(f"warm start: reusing {out_dir}", flush=True)
        return out_dir
    torch.manual_seed(cfg.seed)
    model, processor = load_tiny_vlm(
        cfg.model_family, seed=cfg.seed, tokenizer=getattr(cfg, "tokenizer", "qwen")
    )
    losses = warm_start(
        model,
        processor,
        items,
        steps=cfg.warm_start_steps,
        batch_size=cfg.warm_start_batch_size,
        lr=cfg.warm_start_lr,
        weight_decay=0.0,
        grad_clip=1.0,
        seed=cfg.seed,
        rlcr_fraction=getattr(cfg, "warm_start_rlcr_fraction", 0.0),
    )
    if losses:
        print(f"warm start: loss {losses[0]:.3f} -> {losses[-1]:.3f} in {len(losses)} steps", flush=True)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    (tmp / "warm_start_losses.json").write_text(json.dumps(losses), encoding="utf-8")
    tmp.rename(out_dir)
    return out_dir
