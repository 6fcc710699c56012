"""``vlcal metrics IN.jsonl [--json] [--plot out.png]``: calibration metrics of scored answers.

Each input line is a JSON object with a confidence in [0, 1] (``--confidence-key``, default
``confidence``) and a correctness flag (``--correct-key``, default ``correct``; ``accuracy``, the key
``vlcal score`` writes, is accepted when ``correct`` is absent). A null confidence is an unparsed
answer: it counts as confidence 0 and lowers the reported ``parse_rate`` (as does ``parse_ok: false``).
Malformed input stops with exit code 2 and a message naming the line and the field. The file is UTF-8
(a byte-order mark is skipped); lines repeating an earlier line's (benchmark, uid) are counted, with a
warning on stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

EXIT_BAD_INPUT = 2
MAX_BINS = 1000
"""Upper bound of --n-bins: beyond it bins hold a handful of answers each and the plot takes minutes."""


class InputError(ValueError):
    """Malformed input; the message names the line and the field."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", type=Path, help="JSONL with a confidence and a correctness flag per line")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument(
        "--plot",
        type=Path,
        default=None,
        help="write the reliability diagram here; the extension picks the format (.png, .pdf, .svg, ...)",
    )
    parser.add_argument("--confidence-key", default="confidence", help="field holding Φ in [0, 1]")
    parser.add_argument("--correct-key", default="correct", help="field holding correctness (bool or 0/1)")
    parser.add_argument(
        "--n-bins", type=int, default=10, help=f"equal-width ECE bins, 1..{MAX_BINS} (default 10)"
    )


def read_pairs(
    path: Path,
    confidence_key: str = "confidence",
    correct_key: str = "correct",
    uids: list | None = None,
) -> tuple[list[float], list[float], list[bool]]:
    """(confidence, correct, parsed) lists from a JSONL file; InputError names line and field.

    ``uids``, when given, receives each record's (benchmark, uid) key (None without a uid)."""
    from tqdm import tqdm

    from vlcal_verl.commands.inputs import ENCODING, not_utf8, uid_key

    try:
        handle = path.open(encoding=ENCODING)
        size = path.stat().st_size
    except OSError as err:
        raise InputError(f"{path}: cannot read ({err.strerror or err})") from None
    conf: list[float] = []
    corr: list[float] = []
    parsed: list[bool] = []
    with handle, tqdm(total=size, unit="B", unit_scale=True, desc="reading", disable=size < 8_000_000) as bar:
        try:
            for lineno, line in enumerate(handle, start=1):
                bar.update(len(line.encode("utf-8")))
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise InputError(f"{path} line {lineno}: not valid JSON ({err.msg})") from None
                if not isinstance(record, dict):
                    raise InputError(
                        f"{path} line {lineno}: expected a JSON object, got {type(record).__name__}"
                    )
                c, ok, p = _pair(record, f"{path} line {lineno}", confidence_key, correct_key)
                conf.append(c)
                corr.append(ok)
                parsed.append(p)
                if uids is not None:
                    uids.append(uid_key(record))
        except UnicodeDecodeError:
            raise InputError(not_utf8(path)) from None
    if not conf:
        raise InputError(f"{path}: no records")
    return conf, corr, parsed


def _pair(
    record: dict[str, Any], where: str, confidence_key: str, correct_key: str
) -> tuple[float, float, bool]:
    """One record → (confidence, correct, parsed), validating both fields."""
    if confidence_key not in record:
        raise InputError(f"{where}: missing field {confidence_key!r}")
    key = correct_key
    if key not in record and correct_key == "correct" and "accuracy" in record:
        key = "accuracy"
    if key not in record:
        raise InputError(f"{where}: missing field {correct_key!r}")
    correct = record[key]
    if isinstance(correct, bool):
        correct = float(correct)
    if not isinstance(correct, int | float) or correct not in (0, 1):
        raise InputError(f"{where}: field {key!r} must be true/false or 0/1, got {correct!r}")
    confidence = record[confidence_key]
    parsed = confidence is not None and record.get("parse_ok", True) is not False
    if confidence is None:
        return 0.0, float(correct), False
    if (
        isinstance(confidence, bool)
        or not isinstance(confidence, int | float)
        or not math.isfinite(confidence)
    ):
        raise InputError(
            f"{where}: field {confidence_key!r} must be a number in [0, 1] or null, got {confidence!r}"
        )
    if not 0.0 <= confidence <= 1.0:
        raise InputError(
            f"{where}: field {confidence_key!r} = {confidence!r} is outside [0, 1] (divide 0..10 scores by 10)"
        )
    return float(confidence), float(correct), parsed


def format_table(result: dict[str, Any]) -> str:
    """Human-readable two-column table of the metrics dict."""
    order = [
        "n",
        "accuracy",
        "ece",
        "auroc",
        "brier",
        "aurc",
        "mean_conf",
        "mean_conf_correct",
        "mean_conf_wrong",
        "parse_rate",
    ]
    rows = []
    for key in order:
        if key in result:
            value = result[key]
            text = "n/a" if value is None else (str(value) if isinstance(value, int) else f"{value:.4f}")
            rows.append(f"{key:<18} {text}")
    if result.get("auroc_note"):
        rows.append(f"{'note':<18} {result['auroc_note']}")
    return "\n".join(rows)


def check_plot_path(path: Path) -> None:
    """InputError unless matplotlib can write ``path`` (a format it knows, by extension; not a folder)."""
    import shutil

    import matplotlib
    from matplotlib.backend_bases import FigureCanvasBase

    formats = dict(FigureCanvasBase.get_supported_filetypes())
    texsystem = matplotlib.rcParams["pgf.texsystem"]
    if shutil.which(texsystem) is None:  # .pgf needs a TeX install to measure text
        formats.pop("pgf", None)
    if path.is_dir():
        raise InputError(
            f"--plot {path}: is a folder; give a file path, e.g. --plot {path / 'reliability.png'}"
        )
    blocker = next((p for p in path.absolute().parents if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise InputError(f"--plot {path}: {blocker} is a file, not a folder; choose another path")
    ext = path.suffix.lower().lstrip(".")
    if ext not in formats:
        what = f"extension .{ext}" if ext else "no extension"
        raise InputError(
            f"--plot {path}: {what} is not an image format matplotlib writes; use one of "
            + ", ".join("." + e for e in sorted(formats))
        )


def run(args: argparse.Namespace) -> int:
    from vlcal_verl.metrics import calibration_metrics, plot_reliability

    try:
        if not 1 <= args.n_bins <= MAX_BINS:
            raise InputError(f"--n-bins must be in 1..{MAX_BINS}, got {args.n_bins}")
        if args.plot is not None:
            check_plot_path(args.plot)
        uids: list = []
        conf, corr, parsed = read_pairs(args.input, args.confidence_key, args.correct_key, uids)
    except InputError as err:
        print(f"vlcal metrics: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from vlcal_verl.commands.inputs import warn_duplicate_uids

    warn_duplicate_uids("vlcal metrics", str(args.input), uids)
    result = calibration_metrics(conf, corr, n_bins=args.n_bins, parsed=parsed)
    if args.plot is not None:
        result["plot"] = str(
            plot_reliability(conf, corr, args.plot, title=args.input.name, n_bins=args.n_bins)
        )
    print(json.dumps(result, sort_keys=False) if args.json else format_table(result))
    return 0
