"""Held-out evaluation and figures of the local demo.

The model answers the held-out easy-vqa questions and their unanswerable copies (blank image); the
records go through ``evaluation.report.write_report`` — the same code as ``vlcal eval`` — once after the
warm start ("before RL") and once after RL. This module adds only what is specific to the demo: the
before/after table and the per-step training curves.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from vlcal_verl.local.data import user_message
from vlcal_verl.local.rollout import encode_prompts, generate

TABLE_ROWS = (
    ("parse rate", "parse_rate"),
    ("accuracy", "accuracy"),
    ("ECE", "ece"),
    ("AUROC", "auroc"),
    ("Brier", "brier"),
    ("mean c_v", "mean_vision_confidence"),
    ("mean c_r", "mean_reasoning_confidence"),
    ("unanswerable conf. gap", "unanswerable_gap"),
)


GRADER_KINDS = ("math", "multiple_choice", "yes_no")


def answer_kind(item: Any) -> str | None:
    """The grader's kind of an item (``VQAItem.kind``); None (auto-detect) when it is not a grader kind."""
    kind = getattr(item, "kind", None)
    return kind if kind in GRADER_KINDS else None


@torch.no_grad()
def generate_records(
    model, processor, items: list[Any], cfg, vlcal_cfg, grader, unanswerable: bool
) -> list[dict]:
    """Answer ``items`` (batched, ``cfg.eval_temperature``) and return scored evaluation records."""
    from vlcal_verl.rewards import score_many

    model.eval()
    records: list[dict] = []
    gen = torch.Generator().manual_seed(cfg.seed + 7919)
    bs = cfg.eval_batch_size
    desc = "eval (unanswerable)" if unanswerable else "eval"
    for start in tqdm(range(0, len(items), bs), desc=desc, unit="batch"):
        chunk = items[start : start + bs]
        prompt = encode_prompts(
            processor, [user_message(it.question) for it in chunk], [it.image for it in chunk]
        )
        ro = generate(
            model,
            processor,
            prompt,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.eval_temperature,
            top_k=cfg.top_k,
            generator=gen,
        )
        scored = score_many(
            [(t, it.answer, answer_kind(it)) for t, it in zip(ro.texts, chunk, strict=True)],
            config=vlcal_cfg.reward,
            grader=grader,
        )
        for it, text, s in zip(chunk, ro.texts, scored, strict=True):
            records.append(
                {
                    "benchmark": "easy_vqa",
                    "uid": it.uid,
                    "question": it.question,
                    "answer": it.answer,
                    "response": text,
                    "confidence": s["confidence"],
                    "correct": bool(s["accuracy"]),
                    "parse_ok": bool(s["parse_ok"]),
                    "vision_confidence": s["vision_confidence"],
                    "reasoning_confidence": s["reasoning_confidence"],
                    "unanswerable": unanswerable,
                }
            )
    return records


def summary_row(report: dict[str, Any]) -> dict[str, float | None]:
    """The table's numbers, read from ``write_report``'s ``overall`` block (the same as ``vlcal eval``).

    Every number comes from the report, so the demo table and ``vlcal eval`` cannot disagree.
    """
    overall = report.get("overall") or {}
    keys = (
        "parse_rate",
        "accuracy",
        "ece",
        "auroc",
        "brier",
        "mean_vision_confidence",
        "mean_reasoning_confidence",
        "unanswerable_gap",
    )
    return {k: overall.get(k) for k in keys}


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """Markdown table: one column per phase (e.g. 'after warm start', 'after RL')."""
    names = list(rows)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, key in TABLE_ROWS:
        cells = []
        for n in names:
            v = rows[n].get(key)
            cells.append(
                "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{float(v):.3f}"
            )
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    """Per-RL-step curves: reward, accuracy, S̃_vis, TAR weights (2×2 PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rl = [h for h in history if h.get("phase") == "rl"]
    steps = [h["step"] for h in rl]
    panels = (
        ("reward (mean R)", ["reward/mean"]),
        ("accuracy / parse rate", ["reward/accuracy", "reward/parse_ok"]),
        (
            "S̃_vis (batch mean ± std), mean c_v",
            ["vce/s_vis_mean", "vce/s_vis_std", "reward/vision_confidence"],
        ),
        ("TAR weights on vision tokens", ["tar/weight_mean", "tar/weight_min", "tar/weight_max"]),
    )
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), constrained_layout=True)
    for ax, (title, keys) in zip(axes.flat, panels, strict=True):
        for k in keys:
            ys = [h.get(k) for h in rl]
            if any(y is not None for y in ys):
                ax.plot(steps, [math.nan if y is None else y for y in ys], marker=".", label=k)
        ax.set_title(title)
        ax.set_xlabel("GRPO step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)
    plt.close(fig)
