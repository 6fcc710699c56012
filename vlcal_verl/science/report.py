"""The science report: ``report.md``, ``report.html``, ``science.json`` and the per-step curves.

Everything is read from files the run wrote, so a stub folder with hand-made files tests it:

- ``eval/<name>/metrics.json`` (``vlcal eval``): the table — rows warm start / baseline / full method,
  columns ACC, ECE, AUROC(Φ), Brier, parse rate, AUROC(c_v vs visual_correct), no-image gap of c_v, each
  with its 95% interval (the report's bootstrap intervals; the parse rate's is Wilson's score interval,
  as ``metrics.json`` has none). Several seeds: mean ± std over the seeds' point values.
- ``eval/warm_start/generations.jsonl``: the warm start's accuracy per attribute and question type.
- RLCR baseline (``science.baseline: rlcr``): its one confidence c stands in for c_v — the no-image gap is
  c's, and AUROC(c vs visual_correct) judges z_vis = the first sentence of its ``<think>`` (where its warm
  start writes the description) with the same judge, from ``eval/baseline-seed<S>/generations.jsonl``.
  ``eval/warm_start-rlcr/`` (the warm start prompted in RLCR's layout) adds the RLCR arm's starting row.
- ``rl/<arm>-seed<S>/metrics/verl-*.jsonl`` (verl's file logger): reward, parse rate and ECE per step;
  ``rl/<arm>-seed<S>/rollouts/vlcal-svis-*.jsonl`` (:mod:`.rollouts`): S̃_vis agreement per step and over
  the last ``science.svis_last_steps`` steps.

The targets (:class:`~vlcal_verl.science.config.ScienceConfig`) are printed "met" / "not met" with the
numbers; with several seeds a target uses the mean over seeds, and the ECE interval condition must hold
for every seed.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import time
from pathlib import Path
from typing import Any

from vlcal_verl.science.config import ScienceConfig
from vlcal_verl.science.pipeline import BASELINE, FULL
from vlcal_verl.science.rollouts import agreement, per_step_agreement, read_rows

COLUMNS = ("ACC", "ECE", "AUROC(Φ)", "Brier", "parse rate", "AUROC(c_v, visual)", "no-image gap c_v")
ROW_LABELS = {
    "warm_start": "warm start",
    "warm_start-rlcr": "warm start, RLCR layout (c for c_v)",
    BASELINE: "baseline (RLCR reward, no VCE/TAR)",
    FULL: "full method",
}
BASELINE_LABELS = {
    "rlcr": "RLCR baseline (one confidence c for c_v)",
    "decoupled": "baseline (RLCR reward with c_v, c_r; no VCE/TAR)",
}
_THINK_RE = re.compile(r"<think>(.*?)</think>", re.S)
CURVES = (
    ("reward", "critic/score/mean"),
    ("parse_rate", "calib/parse_rate"),
    ("batch_ece", "calib/ece"),
    ("svis_agreement", None),
)
"""(PNG name, verl metric key) of the per-step curves; S̃_vis agreement comes from the rollout rows."""
COLOURS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
SHAPES = ("circle", "rectangle", "triangle")
CHANCE = {"colour": 1 / len(COLOURS), "shape": 1 / len(SHAPES), "yes/no": 0.5}


def wilson_ci(p: float, n: int, z: float = 1.959964) -> list[float] | None:
    """95% Wilson score interval of a proportion p over n items (None for n = 0)."""
    if not n:
        return None
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [centre - half, centre + half]


def rlcr_think_description(response: str) -> str | None:
    """z_vis of an RLCR response: the first sentence of its ``<think>`` (None without a closed block)."""
    m = _THINK_RE.search(response or "")
    if m is None:
        return None
    text = m.group(1).strip()
    return text[: text.index(".") + 1] if "." in text else text


def rlcr_visual(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """AUROC (ci95) of the RLCR model's one confidence c for visual_correct of its think description:
    the records are judged as the decoupled ones (:mod:`vlcal_verl.evaluation.visual_judge`), with c as c_v."""
    from vlcal_verl.evaluation.visual_judge import judge_item
    from vlcal_verl.evaluation.visual_metrics import visual_block

    judged = []
    for r in records:
        if r.get("unanswerable"):
            continue
        j = judge_item(r.get("uid"), rlcr_think_description(r.get("response", "")))
        if j is not None:
            judged.append(
                {
                    "visual_correct": j.visual_correct,
                    "visual_judgment": j.status,
                    "vision_confidence": r.get("confidence"),
                }
            )
    return (visual_block(judged) or {}).get("c_v")


def row_cells(metrics: dict[str, Any], rlcr_records: list[dict] | None = None) -> dict[str, dict[str, Any]]:
    """The table's columns of one ``metrics.json``: {column: {"value": v, "ci95": [lo, hi] | None}}.
    With ``rlcr_records`` (the generations of an RLCR-protocol evaluation) the visual columns use its one
    confidence c: AUROC of c for the judged think descriptions, the no-image gap of c."""
    o = metrics.get("overall") or {}
    ci = o.get("ci95") or {}
    vis = ((o.get("visual") or {}).get("c_v")) or {}
    gap = ((o.get("no_image_gap") or {}).get("vision_confidence")) or {}
    if rlcr_records is not None:
        vis = rlcr_visual(rlcr_records) or {}
        gap = ((o.get("no_image_gap") or {}).get("confidence")) or {}
    cell = {
        "ACC": (o.get("accuracy"), ci.get("accuracy")),
        "ECE": (o.get("ece"), ci.get("ece")),
        "AUROC(Φ)": (o.get("auroc"), ci.get("auroc")),
        "Brier": (o.get("brier"), ci.get("brier")),
        "parse rate": (
            o.get("parse_rate"),
            wilson_ci(o["parse_rate"], int(o.get("n") or 0)) if o.get("parse_rate") is not None else None,
        ),
        "AUROC(c_v, visual)": (vis.get("auroc"), vis.get("ci95")),
        "no-image gap c_v": (gap.get("gap"), gap.get("ci95")),
    }
    return {k: {"value": v, "ci95": c} for k, (v, c) in cell.items()}


def combine_seeds(per_seed: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """One seed: its cells. Several: {"value": mean, "std": sample std, "ci95": None, "n_seeds"} per column
    (over the seeds where the value exists)."""
    if len(per_seed) == 1:
        return per_seed[0]
    out = {}
    for col in COLUMNS:
        vals = [s[col]["value"] for s in per_seed if s[col]["value"] is not None]
        out[col] = {
            "value": statistics.fmean(vals) if vals else None,
            "std": statistics.stdev(vals) if len(vals) > 1 else None,
            "ci95": None,
            "n_seeds": len(vals),
        }
    return out


def question_type(question: str, answer: str) -> tuple[str, str]:
    """(attribute, question type) of an easy-vqa question: what-colour, what-shape or yes/no, and the
    attribute asked about (a yes/no question names a colour or a shape)."""
    if answer in COLOURS:
        return "colour", "colour"
    if answer in SHAPES:
        return "shape", "shape"
    words = set(question.lower().replace("?", " ").split())
    attribute = "colour" if words & set(COLOURS) else "shape"
    return attribute, f"yes/no ({attribute})"


def attribute_accuracy(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Accuracy per attribute and per question type over answerable records (n, accuracy, chance)."""
    groups: dict[str, list[bool]] = {}
    for r in records:
        if r.get("unanswerable"):
            continue
        attribute, qtype = question_type(str(r.get("question") or ""), str(r.get("ground_truth")))
        for name in (f"attribute: {attribute}", f"question: {qtype}"):
            groups.setdefault(name, []).append(bool(r["correct"]))
    out = {}
    for name in sorted(groups):
        kind = name.split(": ", 1)[1]
        chance = CHANCE["yes/no"] if kind.startswith("yes/no") else CHANCE.get(kind)
        if name.startswith("attribute"):
            chance = None  # an attribute mixes question types with different chance levels
        out[name] = {"n": len(groups[name]), "accuracy": statistics.fmean(groups[name]), "chance": chance}
    return out


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def targets(
    rows: dict[str, dict], per_seed: dict[str, list[dict]], svis: float | None, sc: ScienceConfig
) -> list[dict]:
    """Each target: {"name", "met", "detail"} (``met`` False when a number is missing)."""
    warm, full = rows["warm_start"], rows[FULL]
    w_ece, f_ece = warm["ECE"]["value"], full["ECE"]["value"]
    uppers = [s["ECE"]["ci95"][1] if s["ECE"]["ci95"] else None for s in per_seed[FULL]]
    ece_ok = None not in (w_ece, f_ece) and f_ece <= sc.target_ece_ratio * w_ece
    ci_ok = w_ece is not None and bool(uppers) and all(u is not None and u < w_ece for u in uppers)
    out = [
        {
            "name": f"ECE ≤ {sc.target_ece_ratio} × warm start's, ci95 upper bound below it",
            "met": bool(ece_ok and ci_ok),
            "detail": f"full {_n(f_ece)} (upper {', '.join(map(_n, uppers))}) vs warm start {_n(w_ece)} "
            f"(× {sc.target_ece_ratio} = {_n(None if w_ece is None else sc.target_ece_ratio * w_ece)})",
        }
    ]
    for name, value, threshold in (
        ("AUROC(c_v vs visual_correct)", full["AUROC(c_v, visual)"]["value"], sc.target_visual_auroc),
        ("no-image gap of c_v", full["no-image gap c_v"]["value"], sc.target_no_image_gap),
        ("S̃_vis agreement AUROC (last training steps)", svis, sc.target_svis_auroc),
    ):
        out.append(
            {
                "name": f"{name} ≥ {threshold}",
                "met": value is not None and value >= threshold,
                "detail": f"full {_n(value)}",
            }
        )
    name = "full method above the baseline on AUROC(c_v vs visual_correct), every seed, beyond its ci95"
    if BASELINE not in rows:
        return [*out, {"name": name, "met": False, "detail": "no baseline arm (science.baseline: none)"}]
    col = "AUROC(c_v, visual)"
    f_v, b_v = full[col]["value"], rows[BASELINE][col]["value"]
    # "above" beyond the full method's own sampling noise, in every seed: its ci95 lower bound (its value
    # where no interval was drawn) above the same seed's baseline value
    pairs = [
        ((f[col]["ci95"] or [f[col]["value"]])[0], b[col]["value"])
        for f, b in zip(per_seed[FULL], per_seed[BASELINE], strict=True)
    ]
    above = bool(pairs) and all(lo is not None and b is not None and lo > b for lo, b in pairs)
    out.append(
        {
            "name": name,
            "met": above,
            "detail": f"full {_n(f_v)} vs baseline {_n(b_v)}; per seed, full's ci95 lower bound vs baseline: "
            + ", ".join(f"{_n(lo)} vs {_n(b)}" for lo, b in pairs),
        }
    )
    return out


def _n(v: Any) -> str:
    return "n/a" if v is None else f"{float(v):.3f}"


def _cell(c: dict[str, Any]) -> str:
    if c["value"] is None:
        return "n/a"
    if c.get("std") is not None:
        return f"{c['value']:.3f} ± {c['std']:.3f}"
    return _n(c["value"]) + (f" [{c['ci95'][0]:.3f}, {c['ci95'][1]:.3f}]" if c.get("ci95") else "")


def _eval_cells(folder: Path, rlcr: bool) -> dict[str, dict[str, Any]]:
    """row_cells of one ``eval/<name>/`` folder (an RLCR-protocol one with its generations)."""
    gens = _read_jsonl(folder / "generations.jsonl") if rlcr else None
    return row_cells(_read_json(folder / "metrics.json"), gens)


def build(out: Path, sc: ScienceConfig, seeds: list[int]) -> dict[str, Any]:
    """science.json's content from the run folder ``out`` (see the module docstring for the files)."""
    rlcr = sc.baseline == "rlcr"
    arm_names = (FULL,) if sc.baseline == "none" else (BASELINE, FULL)
    per_seed = {
        arm: [_eval_cells(out / "eval" / f"{arm}-seed{s}", rlcr and arm == BASELINE) for s in seeds]
        for arm in arm_names
    }
    rows = {"warm_start": row_cells(_read_json(out / "eval" / "warm_start" / "metrics.json"))}
    if rlcr and (out / "eval" / "warm_start-rlcr" / "metrics.json").exists():
        rows["warm_start-rlcr"] = _eval_cells(out / "eval" / "warm_start-rlcr", True)
    rows.update({arm: combine_seeds(per_seed[arm]) for arm in arm_names})
    svis_blocks = [
        agreement(read_rows(out / "rl" / f"{FULL}-seed{s}" / "rollouts", sc.svis_last_steps)) for s in seeds
    ]
    svis_aucs = [((b or {}).get("s_vis") or {}).get("auroc") for b in svis_blocks]
    svis = (
        statistics.fmean(a for a in svis_aucs if a is not None)
        if any(a is not None for a in svis_aucs)
        else None
    )
    gens = out / "eval" / "warm_start" / "generations.jsonl"
    return {
        "seeds": seeds,
        "baseline": sc.baseline,
        "evaluate_on": sc.evaluate_on,
        "columns": list(COLUMNS),
        "rows": rows,
        "per_seed": per_seed,
        "svis_agreement": {"last_steps": sc.svis_last_steps, "per_seed": svis_blocks, "auroc_mean": svis},
        "warm_start_accuracy": attribute_accuracy(_read_jsonl(gens)) if gens.exists() else None,
        "targets": targets(rows, per_seed, svis, sc),
    }


EVALUATED_ON = {
    "heldout": "Held-out easy-vqa items (the test split) and their image-removed twins",
    "dev": (
        "**Dev items, not held-out ones**: training-split items whose image no training item shows, and "
        "their image-removed twins (the test split was not read; for choosing settings)"
    ),
}


def markdown(s: dict[str, Any], pngs: list[Path]) -> str:
    """report.md: the table, the targets, the S̃_vis agreement, the warm start per attribute, curves."""
    seeds = s["seeds"]
    how = "value [95% interval]" if len(seeds) == 1 else f"mean ± std over seeds {seeds}"
    items = EVALUATED_ON.get(s.get("evaluate_on", "heldout"), EVALUATED_ON["heldout"])
    lines = ["# VL-Calibration science run", "", f"{items}; {how}.", ""]
    run = s.get("run") or {}
    if run:
        lines += [
            f"Run of {run.get('date_utc')} UTC: `{run.get('recipe')}` {' '.join(run.get('overrides', []))}",
            "",
        ]
    lines += ["| | " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
    labels = {**ROW_LABELS, BASELINE: BASELINE_LABELS.get(s.get("baseline"), ROW_LABELS[BASELINE])}
    for key in ("warm_start", "warm_start-rlcr", BASELINE, FULL):
        if key in s["rows"]:
            cells = " | ".join(_cell(s["rows"][key][c]) for c in COLUMNS)
            lines.append(f"| {labels[key]} | {cells} |")
    if s.get("baseline") == "rlcr":
        lines += [
            "",
            "RLCR rows: the one confidence c stands in for c_v; z_vis is the first sentence of `<think>`.",
        ]
    lines += ["", "## Targets (full method)", ""]
    lines += [f"- {t['name']}: **{'met' if t['met'] else 'not met'}** ({t['detail']})" for t in s["targets"]]
    sv = s["svis_agreement"]
    lines += [
        "",
        f"## S̃_vis agreement over the last {sv['last_steps']} steps' training rollouts (full method)",
        "",
    ]
    for seed, block in zip(seeds, sv["per_seed"], strict=True):
        b = (block or {}).get("s_vis") or {}
        ci = b.get("ci95")
        n = (block or {}).get("n_judged", 0)
        lines.append(
            f"- seed {seed}: AUROC {_n(b.get('auroc'))}"
            + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
            + f" over {n} judged rollouts"
        )
    if s.get("warm_start_accuracy"):
        lines += [
            "",
            "## Warm start: accuracy per attribute and question type",
            "",
            "| group | n | accuracy | chance |",
            "|---|---:|---:|---:|",
        ]
        for name, g in s["warm_start_accuracy"].items():
            lines.append(
                f"| {name} | {g['n']} | {g['accuracy']:.3f} | {_n(g['chance']) if g['chance'] is not None else '–'} |"
            )
    if s.get("timings"):
        lines += ["", "## Timings (s)", ""] + [f"- {k}: {v:.0f}" for k, v in s["timings"].items()]
    lines += [""] + [f"![{p.stem}]({p.name})" for p in pngs]
    return "\n".join(lines) + "\n"


def plot_curves(out: Path, seeds: list[int]) -> list[Path]:
    """One PNG per :data:`CURVES` entry, a line per arm and seed; returns the PNGs written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vlcal_verl.demo.evaluate import read_verl_metrics

    pngs = []
    for name, key in CURVES:
        fig, ax = plt.subplots(figsize=(6, 3.6), constrained_layout=True)
        drawn = False
        for arm in (BASELINE, FULL):
            for seed in seeds:
                run = out / "rl" / f"{arm}-seed{seed}"
                if key is None:
                    pts = [
                        (k, v)
                        for k, v in per_step_agreement(read_rows(run / "rollouts")).items()
                        if v is not None
                    ]
                else:
                    hist = read_verl_metrics(sorted((run / "metrics").glob("verl-*.jsonl")))
                    pts = [(h["step"], float(h[key])) for h in hist if isinstance(h.get(key), int | float)]
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker=".", label=f"{arm} seed {seed}")
                    drawn = True
        ax.set_title(name.replace("_", " "))
        ax.set_xlabel("GRPO step")
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=7)
        path = out / f"curves_{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        pngs.append(path)
    return pngs


def write_report(
    out: Path, sc: ScienceConfig, seeds: list[int], timings: dict[str, float] | None = None
) -> dict[str, Any]:
    """Write science.json, report.md, report.html and the curves into ``out``; print the table; return
    science.json's content."""
    from vlcal_verl.evaluation.report import _html

    s = build(out, sc, seeds)
    s["timings"] = dict(timings or {})
    manifest = out / "run.json"
    s["run"] = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        **(_read_json(manifest) if manifest.exists() else {}),
    }
    pngs = plot_curves(out, seeds)
    md = markdown(s, pngs)
    (out / "science.json").write_text(json.dumps(s, indent=2), encoding="utf-8")
    (out / "report.md").write_text(md, encoding="utf-8")
    (out / "report.html").write_text(_html("VL-Calibration science run", md, s, pngs), encoding="utf-8")
    print(md, flush=True)
    return s
