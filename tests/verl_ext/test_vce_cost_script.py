"""benchmarks/vce_cost.py runs through verl's engine and prints a table a script can read (tiny sizes)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_vce_cost_table_has_the_fused_rows():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "vce_cost.py"), "--shape", "tiny", "--batch", "2",
         "--response", "32", "--span", "8", "--image", "64", "--repeats", "1", "--warmup", "0"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [ln.split("|")[1:-1] for ln in out.stdout.splitlines() if ln.startswith("| ") and "---" not in ln]
    header, body = rows[0], {r[0].strip(): r for r in rows[1:]}
    assert [h.strip() for h in header[:3]] == ["row", "time (s)", "× plain"]
    fused = [name for name in body if name.startswith("fused")]
    assert fused == ["fused: truncated + exact", "fused: full + sampled (authors' variant)"]
    plain = float(body["plain old-log-prob (verl: log-probs + entropy)"][1])
    assert plain > 0 and float(body["plain old-log-prob (verl: log-probs + entropy)"][2]) == 1.0
    for name, r in body.items():
        if name.startswith("plain"):
            continue
        t, ratio = float(r[1]), float(r[2])
        assert t > 0, name
        # one round: the ratio is this row's added time over the plain pass, recomputed here from the two
        # printed times (each rounded to 1 ms, the ratio to 0.01): (t − plain) / plain for the fused rows
        # (they include verl's pass), t / plain for the separate ones
        added = (lambda a, p: (a - p) / p) if name.startswith("fused") else (lambda a, p: a / p)
        bounds = [added(t + dt, plain + dp) for dt in (-5e-4, 5e-4) for dp in (-5e-4, 5e-4)]
        assert min(bounds) - 0.005 <= ratio <= max(bounds) + 0.005, (name, t, plain, ratio)
