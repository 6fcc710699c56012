"""``vlcal eval --compare A B`` and ``vlcal eval --aggregate RUN...``: numbers from finished report folders.

``--compare``: per benchmark and overall, each metric of B − A with a bootstrap 95% interval (paired when
both hold the same (benchmark, uid) items). ``--aggregate``: mean ± sample std of each metric over runs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from vlcal_verl.commands.eval import UsageError, _check_out


def _read_report(folder: Path) -> tuple[dict, list[dict]]:
    metrics_path, gens_path = folder / "metrics.json", folder / "generations.jsonl"
    for p in (metrics_path, gens_path):
        if not p.is_file():
            raise UsageError(f"{folder}: no {p.name} (give a folder written by `vlcal eval --out`)")
    records = [
        json.loads(line) for line in gens_path.read_text(encoding="utf-8").splitlines() if line.strip()
    ]
    if any("correct" not in r or "confidence" not in r for r in records):
        raise UsageError(
            f"{gens_path}: rows without 'correct'/'confidence' (an older report: re-score it with "
            f"`vlcal eval --generations {gens_path} --out NEW`)"
        )
    return json.loads(metrics_path.read_text(encoding="utf-8")), records


def _groups(records: list[dict]) -> dict[str, list[dict]]:
    from vlcal_verl.evaluation.report import _base_name

    answerable = [r for r in records if not r.get("unanswerable", False)]
    out: dict[str, list[dict]] = {}
    for r in answerable:
        out.setdefault(_base_name(r), []).append(r)
    return {**dict(sorted(out.items())), "overall": answerable}


def _pairing(a: list[dict], b: list[dict]) -> tuple[list[dict], list[dict], bool, str]:
    """(A, B) in a common uid order when both hold the same unique (benchmark, uid) items; else as is."""
    key = [[(r.get("benchmark"), r.get("uid")) for r in rs] for rs in (a, b)]
    ok = all(None not in (k[1] for k in ks) and len(set(ks)) == len(ks) for ks in key)
    if ok and set(key[0]) == set(key[1]):
        pos = {k: i for i, k in enumerate(key[1])}
        return a, [b[pos[k]] for k in key[0]], True, f"paired by uid, n = {len(a)}"
    return a, b, False, f"unpaired (items differ), n = {len(a)} / {len(b)}"


def compare_reports(a_dir: Path, b_dir: Path, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Per benchmark and overall, each metric of B − A with a bootstrap 95% interval."""
    from vlcal_verl.evaluation.report import _conf
    from vlcal_verl.metrics import bootstrap_difference

    ga, gb = _groups(_read_report(a_dir)[1]), _groups(_read_report(b_dir)[1])
    out: dict[str, Any] = {"a": str(a_dir), "b": str(b_dir), "n_boot": n_boot, "seed": seed, "groups": {}}
    for name in [n for n in ga if n in gb and ga[n] and gb[n]]:
        ra, rb, paired, how = _pairing(ga[name], gb[name])
        arrays = [([_conf(r) for r in rs], [bool(r["correct"]) for r in rs]) for rs in (ra, rb)]
        diff = bootstrap_difference(arrays[0], arrays[1], paired=paired, n_boot=n_boot, seed=seed)
        out["groups"][name] = {"paired": paired, "how": how, "metrics": diff}
    return out


def _f(v: Any, spec: str = "{:.3f}") -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else spec.format(v)


def compare_table(result: dict[str, Any]) -> str:
    lines = [
        f"B − A: A = {result['a']}, B = {result['b']} ({result['n_boot']} bootstrap resamples, 95% interval)",
        "",
        "| benchmark | metric | A | B | B − A | 95% interval | items |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for name, g in result["groups"].items():
        for metric, m in g["metrics"].items():
            ci = m["ci95"]
            interval = f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "–"
            lines.append(
                f"| {name} | {metric} | {_f(m['a'])} | {_f(m['b'])} | {_f(m['diff'], '{:+.3f}')} | "
                f"{interval} | {g['how']} |"
            )
    return "\n".join(lines)


AGGREGATE_KEYS = (
    "accuracy",
    "auroc",
    "ece",
    "brier",
    "aurc",
    "parse_rate",
    "n_truncated",
    "unanswerable_gap",
)


def aggregate_reports(folders: list[Path]) -> dict[str, Any]:
    """Mean and sample std (ddof 1) of each metric over report folders (e.g. seeds of one model)."""
    import numpy as np

    reports = []
    for folder in folders:
        p = folder / "metrics.json"
        if not p.is_file():
            raise UsageError(f"{folder}: no metrics.json (give folders written by `vlcal eval --out`)")
        reports.append(json.loads(p.read_text(encoding="utf-8")))
    blocks = [
        {**{k: v for k, v in r["per_benchmark"].items() if v and v.get("n")}, "overall": r["overall"]}
        for r in reports
    ]
    names = [n for n in blocks[0] if all(n in b and b[n] for b in blocks)]
    out: dict[str, Any] = {"runs": [str(f) for f in folders], "groups": {}}
    for name in names:
        g = {}
        for key in AGGREGATE_KEYS:
            vals = [b[name].get(key) for b in blocks]
            vals = [float(v) for v in vals if v is not None]
            g[key] = {
                "mean": float(np.mean(vals)) if vals else None,
                "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else None,
                "n_runs": len(vals),
            }
        out["groups"][name] = g
    return out


def aggregate_table(result: dict[str, Any]) -> str:
    keys = AGGREGATE_KEYS
    lines = [
        f"mean ± std (sample std) over {len(result['runs'])} runs",
        "",
        "| benchmark | " + " | ".join(keys) + " |",
        "|---|" + "---:|" * len(keys),
    ]
    for name, g in result["groups"].items():
        cells = [f"{_f(g[k]['mean'])} ± {_f(g[k]['std'])}" for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_summary(args: argparse.Namespace) -> int:
    try:
        folders = args.compare or args.aggregate
        for f in folders:
            if not f.is_dir():
                raise UsageError(f"{f}: no such report folder")
        if args.aggregate is not None and len(args.aggregate) < 2:
            raise UsageError("--aggregate needs at least two report folders")
        _check_out(args.out, [], required=False)
        if args.compare:
            result = compare_reports(*args.compare, n_boot=args.n_boot, seed=args.seed)
            table, stem = compare_table(result), "compare"
        else:
            result = aggregate_reports(args.aggregate)
            table, stem = aggregate_table(result), "aggregate"
    except UsageError as err:
        print(f"vlcal eval: {err}", file=sys.stderr)
        return 2
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
        (args.out / f"{stem}.md").write_text(table + "\n", encoding="utf-8")
    return 0
