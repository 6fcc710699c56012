"""The calibration report: one code path for ``vlcal eval`` and the local demo.

Records (one per answered item) → ``metrics.json``, ``report.md``, ``report.html`` (self-contained,
PNGs embedded) and the PNGs: a reliability diagram per benchmark and overall, and risk–coverage curves.

Conventions (docs/design.md §9): an unparsed confidence counts as 0 (a model that does not say how sure it
is gets no credit for it) and the parse rate is reported; the same metrics over parsed items only
(``parsed_only``) stand beside. Calibration metrics use *answerable* records; records with
``unanswerable: true`` (image removed) only enter the confidence gap
``mean Φ(answerable) − mean Φ(unanswerable)`` and their own summary block.

Every block counts the generations cut at the token limit (``n_truncated``; records carry
``truncated``: true / false / null when unknown) and splits the unparsed ones into
``unparsed_truncated`` (cut off before the confidences) and ``unparsed_malformed`` (ended but not in the
protocol's layout; ``unparsed_unknown`` when truncation is unknown). ``ci95`` holds percentile
bootstrap intervals of ACC, AUROC, ECE, Brier and AURC (:func:`vlcal_verl.metrics.bootstrap_ci`).

Every block also holds ``visual`` (when records carry ``visual_correct``, the exact easy-vqa judge's
verdict on z_vis: its counts and the AUROC of c_v and of S̃_vis for it, with ci95) and ``no_image_gap``
(Φ and c_v, answerable − image removed, with ci95; paired when the blank records are the uid twins);
see :mod:`vlcal_verl.evaluation.visual_metrics`. ``report.md`` shows them in a third table.
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

from vlcal_verl.evaluation.visual_metrics import no_image_gap, visual_block
from vlcal_verl.metrics import bootstrap_ci, calibration_metrics, plot_reliability, plot_risk_coverage

TABLE_COLUMNS = (
    ("n", "n", "{:d}"),
    ("accuracy", "ACC", "{:.3f}"),
    ("auroc", "AUROC", "{:.3f}"),
    ("ece", "ECE", "{:.3f}"),
    ("brier", "Brier", "{:.3f}"),
    ("aurc", "AURC", "{:.3f}"),
    ("parse_rate", "parse", "{:.3f}"),
    ("n_truncated", "trunc", "{:d}"),
    ("mean_vision_confidence", "c_v", "{:.3f}"),
    ("mean_reasoning_confidence", "c_r", "{:.3f}"),
)
REQUIRED_KEYS = ("confidence", "correct")
CI_COLUMNS = (("accuracy", "ACC"), ("auroc", "AUROC"), ("ece", "ECE"), ("brier", "Brier"), ("aurc", "AURC"))


def truncation_counts(records: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """``n_truncated`` and the unparsed records split by cause: ``unparsed_truncated`` (hit the token
    limit), ``unparsed_malformed`` (ended, yet not parseable), ``unparsed_unknown`` (truncation unknown)."""
    unparsed = [r for r in records if not _parsed(r)]
    return {
        "n_truncated": sum(r.get("truncated") is True for r in records),
        "unparsed_truncated": sum(r.get("truncated") is True for r in unparsed),
        "unparsed_malformed": sum(r.get("truncated") is False for r in unparsed),
        "unparsed_unknown": sum(r.get("truncated") is None for r in unparsed),
    }


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


def group_metrics(
    records: Sequence[Mapping[str, Any]], n_boot: int = 1000, seed: int = 0
) -> dict[str, Any] | None:
    """Metrics of one group of answerable records; None for an empty group. ``n_boot`` 0: no ``ci95``.

    >>> m = group_metrics([{"confidence": 0.9, "correct": True}, {"confidence": None, "correct": False}])
    >>> m["accuracy"], m["parse_rate"], round(m["brier"], 12)
    (0.5, 0.5, 0.005)
    """
    if not records:
        return None
    conf = [_conf(r) for r in records]
    correct = [bool(r["correct"]) for r in records]
    parsed = [_parsed(r) for r in records]
    out = calibration_metrics(conf, correct, parsed=parsed)
    out.update(truncation_counts(records))
    if n_boot:
        out["ci95"] = bootstrap_ci(conf, correct, n_boot=n_boot, seed=seed)
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
        **truncation_counts(records),
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


def compute_report_metrics(
    records: Sequence[Mapping[str, Any]], title: str = "", n_boot: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """The ``metrics.json`` content: ``overall`` and ``per_benchmark`` blocks (see module docstring);
    ``bootstrap`` says how ``ci95`` was drawn (``n_boot`` 0: no intervals)."""
    _check_records(records)
    answerable = [r for r in records if not r.get("unanswerable", False)]
    blank = [r for r in records if r.get("unanswerable", False)]
    per: dict[str, Any] = {}
    for name in sorted({_base_name(r) for r in records}):
        a = [r for r in answerable if _base_name(r) == name]
        b = [r for r in blank if _base_name(r) == name]
        block = _with_gap(group_metrics(a, n_boot, seed), unanswerable_block(b))
        per[name] = block if block is not None else {"n": 0, "unanswerable": unanswerable_block(b)}
        per[name].update(visual=visual_block(a, n_boot, seed), no_image_gap=no_image_gap(a, b, n_boot, seed))
    overall = _with_gap(group_metrics(answerable, n_boot, seed), unanswerable_block(blank))
    if overall is not None:
        overall["visual"] = visual_block(answerable, n_boot, seed)
        overall["no_image_gap"] = no_image_gap(answerable, blank, n_boot, seed)
    boot = {"n_boot": n_boot, "seed": seed, "level": 0.95, "method": "percentile, items resampled"}
    return {"title": title, "overall": overall, "per_benchmark": per, "bootstrap": boot if n_boot else None}


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


def ci_table(metrics: Mapping[str, Any]) -> str:
    """Point value and 95% bootstrap interval of ACC, AUROC, ECE, Brier, AURC per benchmark; "" when
    the report has no intervals."""
    rows = [*metrics["per_benchmark"].items(), ("**overall**", metrics["overall"])]
    rows = [(name, m) for name, m in rows if m and m.get("n") and m.get("ci95")]
    if not rows:
        return ""
    boot = metrics.get("bootstrap") or {}
    lines = [
        f"95% bootstrap intervals ({boot.get('n_boot')} resamples of the items, seed {boot.get('seed')}; "
        "unparsed confidence = 0):",
        "",
        "| benchmark | " + " | ".join(label for _, label in CI_COLUMNS) + " |",
        "|---|" + "---:|" * len(CI_COLUMNS),
    ]
    for name, m in rows:
        cells = []
        for key, _ in CI_COLUMNS:
            ci = m["ci95"].get(key)
            interval = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
            cells.append(_fmt(m.get(key), "{:.3f}") + interval)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _with_ci(block: Mapping[str, Any] | None, key: str, spec: str = "{:.3f}") -> str:
    if not block or block.get(key) is None:
        return "–"
    ci = block.get("ci95")
    return _fmt(block[key], spec) + (f" [{spec.format(ci[0])}, {spec.format(ci[1])}]" if ci else "")


def visual_table(metrics: Mapping[str, Any]) -> str:
    """Per benchmark: the exact visual judge's counts, AUROC of c_v and of S̃_vis for ``visual_correct``,
    and the no-image gaps of c_v and Φ, each with its 95% interval; "" when no block has any of them."""
    rows = [*metrics["per_benchmark"].items(), ("**overall**", metrics["overall"])]
    rows = [(n, m) for n, m in rows if m and (m.get("visual") or m.get("no_image_gap"))]
    if not rows:
        return ""
    head = ["judged", "correct", "undescribed", "no vision", "AUROC(c_v, visual)", "AUROC(S̃_vis, visual)"]
    head += ["no-image gap c_v", "no-image gap Φ"]
    lines = [
        "Visual correctness (exact easy-vqa judge: names the true colour and shape, nothing else; "
        "c_v unparsed = 0) and the no-image gap (mean answerable − mean image removed):",
        "",
        "| benchmark | " + " | ".join(head) + " |",
        "|---|" + "---:|" * len(head),
    ]
    for name, m in rows:
        v, g = m.get("visual") or {}, m.get("no_image_gap") or {}
        cells = [f"{v['n_judged']} / {v['n_items']}" if v else "–"]
        cells += [_fmt(v.get(k), "{:d}") for k in ("n_correct", "n_undescribed", "n_no_vision")]
        cells += [_with_ci(v.get("c_v"), "auroc"), _with_ci(v.get("s_vis"), "auroc")]
        cells += [_with_ci(g.get(k), "gap", "{:+.3f}") for k in ("vision_confidence", "confidence")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def truncation_note(metrics: Mapping[str, Any]) -> str:
    """One line: how many generations hit the token limit, and why the unparsed ones are unparsed."""
    o = metrics.get("overall") or {}
    if not o.get("n"):
        return ""
    parts = [
        f"{o['n_truncated']} of {o['n']} answerable generations hit the token limit (`trunc`)",
        f"unparsed: {o['unparsed_truncated']} cut off, {o['unparsed_malformed']} malformed",
    ]
    if o.get("unparsed_unknown"):
        parts.append(f"{o['unparsed_unknown']} of unknown cause (no `truncated` field)")
    return "; ".join(parts) + "."


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
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Write ``metrics.json``, ``report.md``, ``report.html`` and PNGs to ``out_dir``; return the metrics.

    ``records``: dicts with ``confidence`` (Φ in [0, 1] or None = unparsed), ``correct``, and optionally
    ``benchmark``, ``parse_ok``, ``vision_confidence``, ``reasoning_confidence``, ``unanswerable``,
    ``uid``, ``s_vis``, ``truncated``. ``judgments`` (uid → 0/1) adds the S̃_vis agreement block;
    ``n_boot`` bootstrap resamples (seeded by ``seed``) give the ``ci95`` intervals (0: none).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = compute_report_metrics(records, title, n_boot=n_boot, seed=seed)
    if judgments is not None:
        metrics["visual_agreement"] = visual_agreement(records, judgments)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    table = "\n\n".join(
        part
        for part in (
            markdown_table(metrics),
            truncation_note(metrics),
            ci_table(metrics),
            visual_table(metrics),
        )
        if part
    )
    pngs = _plots(records, out, title)
    md = [f"# {title}", "", table, ""]
    md += [f"![{p.stem}]({p.name})" for p in pngs]
    (out / "report.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    (out / "report.html").write_text(_html(title, table, metrics, pngs), encoding="utf-8")
    return metrics
