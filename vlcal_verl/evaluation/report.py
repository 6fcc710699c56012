"""The calibration report: one code path for ``vlcal eval`` and the local demo.

Records (one per answered item) → ``metrics.json``, ``report.md``, ``report.html`` (self-contained,
PNGs embedded) and the PNGs: a reliability diagram per benchmark and overall, and risk–coverage curves.

Conventions (DESIGN.md §8): an unparsed confidence counts as 0 (a model that does not say how sure it
is gets no credit for it) and the parse rate is reported; the same metrics over parsed items only
(``parsed_only``) stand beside. Calibration metrics use *answerable* records; records with
``unanswerable: true`` (image removed) only enter the confidence gap
``mean Φ(answerable) − mean Φ(unanswerable)`` and their own summary block.
"""

from __future__ import annotations

import base64
import html
import json
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlcal_verl.metrics import calibration_metrics, plot_reliability, plot_risk_coverage

TABLE_COLUMNS = (
    ("n", "n", "{:d}"),
    ("accuracy", "ACC", "{:.3f}"),
    ("auroc", "AUROC", "{:.3f}"),
    ("ece", "ECE", "{:.3f}"),
    ("brier", "Brier", "{:.3f}"),
    ("aurc", "AURC", "{:.3f}"),
    ("parse_rate", "parse", "{:.3f}"),
    ("mean_vision_confidence", "c_v", "{:.3f}"),
    ("mean_reasoning_confidence", "c_r", "{:.3f}"),
)
REQUIRED_KEYS = ("confidence", "correct")


def _check_records(records: Sequence[Mapping[str, Any]]) -> None:
    for i, r in enumerate(records):
        for key in REQUIRED_KEYS:
            if key not in r:
                raise ValueError(f"record {i}: missing field {key!r}")
        c = r["confidence"]
        if c is not None and not (isinstance(c, numbers.Real) and 0.0 <= float(c) <= 1.0):
            raise ValueError(f"record {i}: field 'confidence' must be null or a number in [0, 1], got {c!r}")


def _mean(values: Sequence[Any]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def _conf(r: Mapping[str, Any]) -> float:
    """Φ with an unparsed confidence counted as 0."""
    return 0.0 if r["confidence"] is None else float(r["confidence"])


def _parsed(r: Mapping[str, Any]) -> bool:
    return bool(r.get("parse_ok", r["confidence"] is not None)) and r["confidence"] is not None


def group_metrics(records: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Metrics of one group of answerable records; None for an empty group.

    >>> m = group_metrics([{"confidence": 0.9, "correct": True}, {"confidence": None, "correct": False}])
    >>> m["accuracy"], m["parse_rate"], m["brier"]
    (0.5, 0.5, 0.005)
    """
    if not records:
        return None
    conf = [_conf(r) for r in records]
    correct = [bool(r["correct"]) for r in records]
    parsed = [_parsed(r) for r in records]
    out = calibration_metrics(conf, correct, parsed=parsed)
    out["mean_vision_confidence"] = _mean([r.get("vision_confidence") for r in records])
    out["mean_reasoning_confidence"] = _mean([r.get("reasoning_confidence") for r in records])
    ok = [r for r, p in zip(records, parsed, strict=True) if p]
    out["parsed_only"] = (
        calibration_metrics([_conf(r) for r in ok], [bool(r["correct"]) for r in ok]) if ok else None
    )
    return out


def unanswerable_block(records: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Mean confidences on unanswerable (image-removed) records; None when there are none."""
    if not records:
        return None
    return {
        "n": len(records),
        "mean_conf": _mean([_conf(r) for r in records]),
        "mean_vision_confidence": _mean([r.get("vision_confidence") for r in records]),
        "mean_reasoning_confidence": _mean([r.get("reasoning_confidence") for r in records]),
        "accuracy": _mean([float(bool(r["correct"])) for r in records]),
    }


def _with_gap(metrics: dict[str, Any] | None, blank: dict[str, Any] | None) -> dict[str, Any] | None:
    if metrics is None:
        return None
    metrics["unanswerable"] = blank
    metrics["unanswerable_gap"] = (
        metrics["mean_conf"] - blank["mean_conf"] if blank and blank["mean_conf"] is not None else None
    )
    return metrics


def _base_name(r: Mapping[str, Any]) -> str:
    name = str(r.get("benchmark", "all"))
    return name.removesuffix("-unanswerable").removesuffix("_unanswerable")


def compute_report_metrics(records: Sequence[Mapping[str, Any]], title: str = "") -> dict[str, Any]:
    """The ``metrics.json`` content: ``overall`` and ``per_benchmark`` blocks (see module docstring)."""
    _check_records(records)
    answerable = [r for r in records if not r.get("unanswerable", False)]
    blank = [r for r in records if r.get("unanswerable", False)]
    per: dict[str, Any] = {}
    for name in sorted({_base_name(r) for r in records}):
        a = [r for r in answerable if _base_name(r) == name]
        b = [r for r in blank if _base_name(r) == name]
        block = _with_gap(group_metrics(a), unanswerable_block(b))
        per[name] = block if block is not None else {"n": 0, "unanswerable": unanswerable_block(b)}
    overall = _with_gap(group_metrics(answerable), unanswerable_block(blank))
    return {"title": title, "overall": overall, "per_benchmark": per}


def visual_agreement(records: Sequence[Mapping[str, Any]], judgments: Mapping[str, float]) -> dict[str, Any]:
    """Agreement of S̃_vis with external visual judgments (uid → 1 saw correctly / 0 did not).

    AUROC of S̃_vis for the judgment (scikit-learn), Spearman ρ and Kendall τ (SciPy); records without
    ``s_vis`` or without a judgment are left out and counted.
    """
    from scipy.stats import kendalltau, spearmanr

    from vlcal_verl.metrics import auroc_with_reason

    pairs = [
        (float(r["s_vis"]), float(judgments[r["uid"]]))
        for r in records
        if r.get("s_vis") is not None and r.get("uid") in judgments and np.isfinite(r["s_vis"])
    ]
    out: dict[str, Any] = {"n": len(pairs), "n_missing": len(records) - len(pairs)}
    if len(pairs) < 2:
        return {**out, "auroc": None, "spearman": None, "kendall": None}
    s, j = map(np.asarray, zip(*pairs, strict=True))
    auc, note = auroc_with_reason(s, j) if set(np.unique(j)) <= {0.0, 1.0} else (None, "judgments not 0/1")
    rho, tau = spearmanr(s, j).statistic, kendalltau(s, j).statistic
    out.update(
        auroc=auc,
        spearman=None if np.isnan(rho) else float(rho),
        kendall=None if np.isnan(tau) else float(tau),
    )
    if note:
        out["auroc_note"] = note
    return out


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    return spec.format(int(value)) if spec == "{:d}" else spec.format(float(value))


def markdown_table(metrics: Mapping[str, Any]) -> str:
    """One row per benchmark plus 'overall'; parsed-only ACC/AUROC/ECE and the no-image gap beside."""
    head = [label for _, label, _ in TABLE_COLUMNS] + [
        "ACC (parsed)",
        "AUROC (parsed)",
        "ECE (parsed)",
        "gap",
    ]
    lines = ["| benchmark | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)]
    rows = [*metrics["per_benchmark"].items(), ("**overall**", metrics["overall"])]
    for name, m in rows:
        if not m or not m.get("n"):
            continue
        po = m.get("parsed_only") or {}
        cells = [_fmt(m.get(k), spec) for k, _, spec in TABLE_COLUMNS]
        cells += [_fmt(po.get(k), "{:.3f}") for k in ("accuracy", "auroc", "ece")]
        cells.append(_fmt(m.get("unanswerable_gap"), "{:+.3f}"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plots(records: Sequence[Mapping[str, Any]], out_dir: Path, title: str) -> list[Path]:
    answerable = [r for r in records if not r.get("unanswerable", False)]
    if not answerable:
        return []
    paths = [
        plot_reliability(
            [_conf(r) for r in answerable],
            [bool(r["correct"]) for r in answerable],
            out_dir / "reliability.png",
            title=title or "all benchmarks",
        )
    ]
    names = sorted({_base_name(r) for r in answerable})
    curves = {}
    for name in names:
        group = [r for r in answerable if _base_name(r) == name]
        curves[name] = ([_conf(r) for r in group], [bool(r["correct"]) for r in group])
        if len(names) > 1:
            safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)
            paths.append(plot_reliability(*curves[name], out_dir / f"reliability_{safe}.png", title=name))
    paths.append(
        plot_risk_coverage(curves, out_dir / "risk_coverage.png", title=f"risk–coverage {title}".strip())
    )
    return paths


def _html(title: str, table_md: str, metrics: Mapping[str, Any], pngs: Sequence[Path]) -> str:
    """One self-contained page: the table (as preformatted Markdown), the PNGs inline, the raw JSON."""
    imgs = "\n".join(
        f'<figure><img alt="{html.escape(p.name)}" src="data:image/png;base64,'
        f'{base64.b64encode(p.read_bytes()).decode()}"><figcaption>{html.escape(p.name)}</figcaption></figure>'
        for p in pngs
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}pre{background:#f6f6f6;padding:1em;overflow:auto}"
        "figure{display:inline-block;margin:1em}img{max-width:520px}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><h2>Metrics</h2><pre>{html.escape(table_md)}</pre>"
        f"<h2>Plots</h2>{imgs}<h2>metrics.json</h2>"
        f"<pre>{html.escape(json.dumps(metrics, indent=2))}</pre></body></html>"
    )


def write_report(
    records: Sequence[Mapping[str, Any]],
    out_dir: str | Path,
    title: str = "vlcal evaluation",
    judgments: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Write ``metrics.json``, ``report.md``, ``report.html`` and PNGs to ``out_dir``; return the metrics.

    ``records``: dicts with ``confidence`` (Φ in [0, 1] or None = unparsed), ``correct``, and optionally
    ``benchmark``, ``parse_ok``, ``vision_confidence``, ``reasoning_confidence``, ``unanswerable``,
    ``uid``, ``s_vis``. ``judgments`` (uid → 0/1) adds the S̃_vis agreement block.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = compute_report_metrics(records, title)
    if judgments is not None:
        metrics["visual_agreement"] = visual_agreement(records, judgments)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    table = markdown_table(metrics)
    pngs = _plots(records, out, title)
    md = [f"# {title}", "", table, ""]
    md += [f"![{p.stem}]({p.name})" for p in pngs]
    (out / "report.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    (out / "report.html").write_text(_html(title, table, metrics, pngs), encoding="utf-8")
    return metrics
