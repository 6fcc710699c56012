"""Before/after report of the local demo (``<out>/report/``).

``evaluate_phase`` answers the held-out split and its unanswerable copies, and hands the records to
``vlcal_verl.evaluation.report.write_report`` (the code behind ``vlcal eval``: metrics JSON, reliability
diagram) under ``<out>/report/<phase>/``. ``final_report`` evaluates after RL, writes the per-step
curves (``curves.png``), the before/after table (``summary.md``, ``summary.json``) and prints the table.
"""

from __future__ import annotations

import json
from typing import Any

from vlcal_verl.local.evaluate import format_table, generate_records, plot_curves, summary_row


def evaluate_phase(engine, phase: str) -> dict[str, Any]:
    """Evaluate the current policy; write ``report/<phase>/``; return {'row', 'records', 'metrics'}."""
    from vlcal_verl.evaluation.report import write_report

    lc, data = engine.lc, engine.data
    records = generate_records(engine.model, engine.processor, data.eval, lc, engine.vc, engine.grader, False)
    records += generate_records(
        engine.model, engine.processor, data.unanswerable, lc, engine.vc, engine.grader, True
    )
    out_dir = engine.out / "report" / phase
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "records.jsonl", "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    metrics = write_report(records, out_dir, title=f"easy-vqa held-out, {phase.replace('_', ' ')}")
    row = summary_row(metrics)
    (out_dir / "summary_row.json").write_text(json.dumps(row, indent=2), encoding="utf-8")
    print(
        f"[eval {phase}] " + " ".join(f"{k}={v:.3f}" for k, v in row.items() if isinstance(v, float)),
        flush=True,
    )
    return {"row": row, "records": records, "metrics": metrics}


def final_report(engine, before: dict[str, Any] | None) -> dict[str, Any]:
    """Evaluate after RL, plot the curves, write and print the before/after table."""
    report_dir = engine.out / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    if before is None:  # resumed run: the warm-start evaluation was written by the first run
        path = report_dir / "after_warm_start" / "summary_row.json"
        before = {"row": json.loads(path.read_text(encoding="utf-8"))} if path.exists() else None
    after = evaluate_phase(engine, "after_rl")
    history = engine.logger.read()
    plot_curves(history, report_dir / "curves.png")
    rows = {}
    if before is not None:
        rows["after warm start"] = before["row"]
    rows["after RL"] = after["row"]
    table = format_table(rows)
    rl = [h for h in history if h.get("phase") == "rl"]
    nonzero = [h.get("adv/nonzero_frac", 0.0) or 0.0 for h in rl]
    notes = (
        f"GRPO steps: {len(rl)}; steps with non-zero advantages: {sum(v > 0 for v in nonzero)}; "
        f"held-out items: {len(engine.data.eval)} (+{len(engine.data.unanswerable)} unanswerable)"
    )
    (report_dir / "summary.md").write_text(table + "\n\n" + notes + "\n", encoding="utf-8")
    (report_dir / "summary.json").write_text(
        json.dumps({"rows": rows, "notes": notes}, indent=2), encoding="utf-8"
    )
    print("\n" + table + "\n" + notes + f"\nreport: {report_dir}", flush=True)
    return {"rows": rows, "table": table, "notes": notes}
