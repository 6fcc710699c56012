"""S̃_vis against the exact visual judge over verl's training rollouts.

verl dumps each step's rollouts when ``trainer.rollout_data_dir`` is set (``<step>.jsonl``: prompt,
response, score; its own ``_log_rollout_data``), but S̃_vis is computed by the trainer's VCE step after
the reward and is not in that dump. With the same setting the trainer also writes, per step,
``vlcal-svis-<step>.jsonl`` beside it (:func:`write_step_rows`, called from
``VLCalTrainer._vlcal_visual_reward``): per rollout the TransferQueue key (verl's dump calls it ``uid``),
the item uid, S̃_vis, c_v and the exact judge's verdict on its z_vis
(:func:`vlcal_verl.evaluation.visual_judge.judge_item`). The science report pools the last steps' rows
(:func:`read_rows`) and reads them with the evaluation report's :func:`visual_block` (AUROC with ci95).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

PREFIX = "vlcal-svis-"
_STEP_RE = re.compile(rf"{PREFIX}(\d+)\.jsonl")


def judged_rows(
    keys: Sequence[str],
    item_uids: Sequence[Any],
    responses: Sequence[str],
    s_tilde: Sequence[float],
    c_v: Sequence[float | None],
    step: int,
) -> list[dict[str, Any]]:
    """One row per rollout: ``visual_correct`` / ``visual_judgment`` from the exact judge (None, None for
    a non-easy-vqa item), ``s_vis`` (None where the rollout had no vision span), ``vision_confidence``."""
    from vlcal_verl.evaluation.visual_judge import judge_item
    from vlcal_verl.protocol import parse_response

    rows = []
    for key, uid, text, s, cv in zip(keys, item_uids, responses, s_tilde, c_v, strict=True):
        j = judge_item(uid, parse_response(text, "decoupled").vision) if uid is not None else None
        s = float(s)
        rows.append(
            {
                "step": int(step),
                "key": str(key),
                "uid": uid,
                "s_vis": s if math.isfinite(s) else None,
                "vision_confidence": None if cv is None else float(cv),
                "visual_correct": None if j is None else j.visual_correct,
                "visual_judgment": None if j is None else j.status,
            }
        )
    return rows


def write_step_rows(
    rollout_dir: str | Path, step: int, batch: Any, s_tilde: Any, c_v: list, tokenizer
) -> Path:
    """The trainer's hook: fetch the item uids and responses of ``batch`` from TransferQueue, judge them,
    write ``vlcal-svis-<step>.jsonl`` (padding rows, which have no item, are left out)."""
    import transfer_queue as tq

    data = tq.kv_batch_get(
        keys=batch.keys, partition_id=batch.partition_id, select_fields=["extra_info", "responses"]
    )
    infos = [getattr(i, "data", i) for i in list(data["extra_info"])]  # NonTensorData rows, as in the trainer
    texts = [tokenizer.decode(r.cpu().tolist(), skip_special_tokens=True) for r in data["responses"].unbind()]
    valid = [not tag.get("is_padding", False) for tag in batch.tags]
    uids = [i.get("uid") if isinstance(i, Mapping) else None for i in infos]
    keep = [k for k, ok in enumerate(valid) if ok]
    rows = judged_rows(
        [batch.keys[k] for k in keep],
        [uids[k] for k in keep],
        [texts[k] for k in keep],
        [float(s_tilde[k]) for k in keep],
        [c_v[k] for k in keep],
        step,
    )
    path = Path(rollout_dir) / f"{PREFIX}{int(step)}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def read_rows(rollout_dir: Path, last_steps: int | None = None) -> list[dict[str, Any]]:
    """The rows of the last ``last_steps`` steps written in ``rollout_dir`` (all when None)."""
    files = {
        int(m.group(1)): p
        for p in Path(rollout_dir).glob(f"{PREFIX}*.jsonl")
        if (m := _STEP_RE.fullmatch(p.name))
    }
    steps = sorted(files)[-last_steps:] if last_steps else sorted(files)
    rows: list[dict[str, Any]] = []
    for s in steps:
        rows += [
            json.loads(line) for line in files[s].read_text(encoding="utf-8").splitlines() if line.strip()
        ]
    return rows


def agreement(rows: Sequence[Mapping[str, Any]], n_boot: int = 1000, seed: int = 0) -> dict[str, Any] | None:
    """AUROC of S̃_vis (and of c_v) for ``visual_correct`` over judged rows, with ci95 and the judge's
    counts (:func:`vlcal_verl.evaluation.visual_metrics.visual_block`); None without judged rows."""
    from vlcal_verl.evaluation.visual_metrics import visual_block

    judged = [r for r in rows if r.get("visual_judgment") is not None]
    return visual_block(judged, n_boot=n_boot, seed=seed) if judged else None


def per_step_agreement(rows: Sequence[Mapping[str, Any]]) -> dict[int, float | None]:
    """Step → AUROC(S̃_vis vs visual_correct) of that step's rollouts (None where undefined)."""
    out: dict[int, float | None] = {}
    for step in sorted({int(r["step"]) for r in rows}):
        block = agreement([r for r in rows if int(r["step"]) == step], n_boot=0)
        out[step] = (block or {}).get("s_vis", {}).get("auroc")
    return out
