"""``vlcal score IN.jsonl -o OUT.jsonl``: score responses offline with the VL-Calibration reward.

Each input line is a JSON object with ``response`` and ``ground_truth`` (and usually ``data_source``;
an optional ``answer_kind`` picks the grader: math, multiple_choice, yes_no). Every other field is
carried through; each output line adds ``score`` and the component keys of
:data:`vlcal_verl.rewards.REWARD_COMPONENT_KEYS` (confidences in [0, 1], null when unparsed). The whole
file is validated before any grading, so a bad line fails fast with its line number and field; so
are the options (finite weights) and the output path (its folder exists and is writable, it is not a
folder itself). The output is written to a temporary file beside it and renamed into place, so an
interrupted run leaves no half-written file (and an existing output file intact).

The input is UTF-8 (a byte-order mark is skipped; other encodings are one line naming the first bad
line); lines repeating an earlier line's uid are scored and counted in a warning on stderr. Scoring is
:func:`vlcal_verl.rewards.score_many`, i.e. ``score_response`` — the function training's
``compute_score`` calls — for every protocol, with or without ``--reference-parity``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

EXIT_BAD_INPUT = 2
_KINDS = ("math", "multiple_choice", "yes_no")  # vlcal_verl.grading.KINDS, without importing it here


class InputError(ValueError):
    """Malformed input; the message names the line and the field."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", type=Path, help="JSONL with response, ground_truth, data_source per line")
    parser.add_argument("-o", "--output", required=True, help="output JSONL ('-' for stdout)")
    parser.add_argument(
        "--protocol", choices=("decoupled", "rlcr"), default="decoupled", help="output protocol"
    )
    parser.add_argument("--workers", type=int, default=None, help="grading processes (default: CPUs)")
    parser.add_argument("--timeout", type=float, default=5.0, help="grading timeout per answer, seconds")
    parser.add_argument(
        "--reference-parity",
        action="store_true",
        help="the authors' reward for --protocol exactly (decoupled: their decouple reward; rlcr: their RLCR "
        "reward, as training's ablation=rlcr, which also sets --w-brier 0.8)",
    )
    parser.add_argument("--w-brier", type=float, default=None, help="weight of the Brier term (2.0)")
    parser.add_argument("--w-fmt", type=float, default=None, help="weight of the format term (0.4)")


def read_records(path: Path) -> list[dict[str, Any]]:
    """Read and validate the input JSONL; raise InputError naming the line and field."""
    from vlcal_verl.commands.inputs import ENCODING, not_utf8

    try:
        handle = path.open(encoding=ENCODING)
    except OSError as err:
        raise InputError(f"{path}: cannot read ({err.strerror or err})") from None
    records = []
    with handle:
        try:
            for lineno, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line, parse_constant=_refuse_constant)
                except json.JSONDecodeError as err:
                    raise InputError(f"{path} line {lineno}: not valid JSON ({err.msg})") from None
                except ValueError as err:
                    raise InputError(f"{path} line {lineno}: {err}") from None
                records.append(_validate(record, path, lineno))
        except UnicodeDecodeError:
            raise InputError(not_utf8(path)) from None
    return records


def _refuse_constant(name: str) -> Any:
    """json.loads accepts NaN/Infinity, which are not JSON and could not be written back out."""
    raise ValueError(f"{name} is not valid JSON (use null or a finite number)")


def _validate(record: Any, path: Path, lineno: int) -> dict[str, Any]:
    where = f"{path} line {lineno}"
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for field in ("response", "ground_truth"):
        if field not in record:
            raise InputError(f"{where}: missing field {field!r}")
    if not isinstance(record["response"], str):
        raise InputError(f"{where}: field 'response' must be a string, got {_kind(record['response'])}")
    gt = record["ground_truth"]
    if isinstance(gt, bool) or not isinstance(gt, str | int | float):
        raise InputError(f"{where}: field 'ground_truth' must be a string or number, got {_kind(gt)}")
    for field in ("data_source", "answer_kind"):
        value = record.get(field)
        if value is not None and not isinstance(value, str):
            raise InputError(f"{where}: field {field!r} must be a string, got {_kind(value)}")
    kind = record.get("answer_kind")
    if kind is not None and kind not in _KINDS:
        raise InputError(
            f"{where}: field 'answer_kind' must be one of {', '.join(_KINDS)} or null, got {kind!r}"
        )
    return record


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _config(args: argparse.Namespace):
    from vlcal_verl.config import RewardConfig

    cfg = RewardConfig(
        protocol=args.protocol, reference_parity=args.reference_parity, grading_timeout_s=args.timeout
    )
    if args.w_brier is not None:
        cfg.w_brier = args.w_brier
    if args.w_fmt is not None:
        cfg.w_fmt = args.w_fmt
    for flag, value in (("--w-brier", args.w_brier), ("--w-fmt", args.w_fmt), ("--timeout", args.timeout)):
        if value is not None and not math.isfinite(value):
            raise InputError(f"{flag} must be a finite number, got {value}")
    if args.timeout <= 0:
        raise InputError(f"--timeout must be > 0, got {args.timeout}")
    if args.workers is not None and args.workers < 1:
        raise InputError(f"--workers must be >= 1, got {args.workers}")
    try:  # the valid ranges of training's --check (vlcal_verl.config.RANGES), named by the flag
        return cfg.validate({"w_brier": "--w-brier", "w_fmt": "--w-fmt", "grading_timeout_s": "--timeout"})
    except ValueError as err:
        raise InputError(str(err)) from None


def check_output(output: str) -> Path | None:
    """The output path (None for stdout), or InputError saying what is wrong with it and what to do."""
    if output == "-":
        return None
    path = Path(output)
    if path.is_dir():
        raise InputError(f"-o {output}: is a folder; give a file path, e.g. -o {path / 'scored.jsonl'}")
    folder = path.parent
    if not folder.exists():
        raise InputError(f"-o {output}: folder {folder} does not exist (create it: mkdir -p {folder})")
    if not folder.is_dir():
        raise InputError(f"-o {output}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"-o {output}: cannot write to folder {folder} (permission denied)")
    return path


def write_jsonl_atomic(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write ``rows`` as JSONL to a temporary file in ``path``'s folder, then rename it to ``path``.

    If anything fails midway the temporary file is removed and ``path`` is untouched.
    """
    umask = os.umask(0)
    os.umask(umask)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            for row in rows:
                out.write(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; give it an ordinary file's mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def run(args: argparse.Namespace) -> int:
    try:
        cfg = _config(args)
        output = check_output(args.output)
        records = read_records(args.input)
    except InputError as err:
        print(f"vlcal score: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from vlcal_verl.commands.inputs import uid_key, warn_duplicate_uids
    from vlcal_verl.rewards import score_many

    warn_duplicate_uids("vlcal score", str(args.input), (uid_key(r) for r in records))
    items = [(r["response"], str(r["ground_truth"]), r.get("answer_kind")) for r in records]
    if cfg.reference_parity or not items:
        results = score_many(items, cfg, progress=True)
    else:
        from vlcal_verl.grading import Grader

        with Grader(max_workers=args.workers, timeout_s=cfg.grading_timeout_s) as grader:
            results = score_many(items, cfg, grader=grader, progress=True)
    rows = ({**record, **result} for record, result in zip(records, results, strict=True))
    if output is None:
        for row in rows:
            sys.stdout.write(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")
    else:
        write_jsonl_atomic(output, rows)
    n_ok = sum(r["parse_ok"] for r in results)
    print(f"vlcal score: {len(results)} responses, {n_ok} parsed → {args.output}", file=sys.stderr)
    return 0
