"""Checks shared by the commands that read JSONL (``score``, ``metrics``, ``eval``, ``judge``).

* Encoding: files are read as UTF-8 with an optional byte-order mark (``utf-8-sig``: Windows editors
  and PowerShell write one, and the reward server accepts it too). Anything else is one line naming
  the first line that does not decode, never a ``UnicodeDecodeError`` traceback.
* Duplicate uids: a line whose (benchmark, uid) repeats an earlier line's is still counted — GRPO
  rollout dumps legitimately hold several responses per prompt uid — but the commands say so on stderr
  with the count, since a file concatenated twice would otherwise double-count every item silently.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

ENCODING = "utf-8-sig"
"""How the commands read text input: UTF-8, a leading byte-order mark skipped."""


def not_utf8(path: Path) -> str:
    """The message for a file that does not decode as UTF-8: its first bad line, byte and column.

    >>> import tempfile, os
    >>> with tempfile.NamedTemporaryFile("wb", suffix=".jsonl", delete=False) as f:
    ...     _ = f.write(b'{"a": "ok"}\\n{"a": "caf\\xe9"}\\n')
    >>> not_utf8(Path(f.name)).split(": ", 1)[1]
    'not UTF-8 (byte 0xe9 at column 11; Latin-1?); convert it, e.g. iconv -f latin1 -t utf-8 IN > OUT'
    >>> os.unlink(f.name)
    """
    with path.open("rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as err:
                byte = raw[err.start]
                return (
                    f"{path} line {lineno}: not UTF-8 (byte 0x{byte:02x} at column {err.start + 1}; "
                    "Latin-1?); convert it, e.g. iconv -f latin1 -t utf-8 IN > OUT"
                )
    return f"{path}: not UTF-8; convert it, e.g. iconv -f latin1 -t utf-8 IN > OUT"


def uid_key(record: Mapping[str, Any]) -> tuple[Any, str] | None:
    """(benchmark, uid) of a record, None when it has no uid (then it is never a duplicate)."""
    uid = record.get("uid")
    if uid is None:
        return None
    return record.get("benchmark"), str(uid)


def count_duplicates(keys: Iterable[tuple[Any, str] | None]) -> tuple[int, str | None]:
    """(lines whose key repeats an earlier line's, the first repeated uid).

    >>> count_duplicates([("b", "1"), ("b", "2"), ("b", "1"), ("c", "1"), None, None, ("b", "1")])
    (2, '1')
    """
    seen: set[tuple[Any, str]] = set()
    repeats, first = 0, None
    for key in keys:
        if key is None:
            continue
        if key in seen:
            repeats += 1
            first = first if first is not None else key[1]
        seen.add(key)
    return repeats, first


def warn_duplicate_uids(prog: str, source: str, keys: Iterable[tuple[Any, str] | None]) -> int:
    """Print one warning line on stderr when ``keys`` repeat; return the number of repeated lines."""
    repeats, first = count_duplicates(keys)
    if repeats:
        print(
            f"{prog}: warning: {repeats} line(s) of {source} repeat a uid already seen (first: {first!r}); "
            "each line is counted — deduplicate the file unless they are distinct responses to one prompt",
            file=sys.stderr,
        )
    return repeats
