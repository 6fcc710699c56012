"""ViRL-39K → the VL-Calibration 12K training set (+ validation split) as verl parquet.

Source: TIGER-Lab/ViRL39K (``39Krelease.parquet`` + ``images/``), fields ``qid``, ``question``,
``answer`` (``\\boxed{...}``), ``image`` (list of relative paths), ``category``, ``source``,
``PassRate_32BTrained``, ``PassRate_72BTrained``.

Sampling rule (ours, documented; the paper states only "12K from ViRL-39K"):
1. drop items whose ``PassRate_72BTrained`` is exactly 1.0 or 0.0 (always solved / never solved: a GRPO
   group of identical rewards has zero advantage) when the field is present (``keep_extremes`` keeps them);
2. order the rest by a seeded shuffle within each ``category`` and take a proportional (largest-remainder)
   share of ``n + val_size`` per category, so category proportions follow the source;
3. the first ``val_size`` of a seeded shuffle of the sample is validation, the rest training.
Images outside docs/design.md §6's pixel bounds [262144, 4194304] are *resized* (aspect kept), not dropped,
so the sample size does not depend on image sizes.
"""

from __future__ import annotations

import contextlib
import random
import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vlcal_verl.data.benchmarks import BenchSpec, load_image, read_hub, read_local

HUB_ID = "TIGER-Lab/ViRL39K"
PASS_RATE = "PassRate_72BTrained"
REQUIRED = ("question", "answer", "image")


def _category(r: Mapping[str, Any]) -> str:
    return str(r.get("category") or "unknown")


def sample_indices(
    records: Sequence[Mapping[str, Any]], n: int, seed: int = 0, keep_extremes: bool = False
) -> list[int]:
    """Indices of the seeded, category-stratified sample of size ``min(n, eligible)`` (see module doc)."""
    by_cat: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        rate = r.get(PASS_RATE)
        if not keep_extremes and rate is not None and float(rate) in (0.0, 1.0):
            continue
        by_cat[_category(r)].append(i)
    total = sum(len(v) for v in by_cat.values())
    n = min(n, total)
    if n == 0:
        return []
    rng = random.Random(seed)
    cats = sorted(by_cat)
    for c in cats:
        rng.shuffle(by_cat[c])
    exact = {c: n * len(by_cat[c]) / total for c in cats}
    take = {c: int(exact[c]) for c in cats}
    for c in sorted(cats, key=lambda c: (-(exact[c] - take[c]), c))[: n - sum(take.values())]:
        take[c] += 1
    chosen = [i for c in cats for i in by_cat[c][: take[c]]]
    rng.shuffle(chosen)
    return chosen


def strip_boxed(answer: str) -> str:
    m = re.fullmatch(r"\s*\\boxed\{(.*)\}\s*", answer, flags=re.S)
    return m.group(1) if m else answer


def answer_kind(answer: str) -> str:
    a = strip_boxed(answer).strip()
    if len(a) == 1 and a.upper() in "ABCDEFGHIJ":
        return "multiple_choice"
    return "yes_no" if a.lower() in ("yes", "no") else "math"


def to_row(r: Mapping[str, Any], index: int, root: Path | None, protocol: str) -> dict:
    from vlcal_verl.data.schema import fit_pixels, make_row

    for key in REQUIRED:
        if key not in r:
            raise ValueError(f"ViRL record {r.get('qid', index)}: missing field {key!r}")
    paths = r["image"] if isinstance(r["image"], list | tuple) else [r["image"]]
    images = [fit_pixels(load_image(p, root, "image")) for p in paths]
    question = re.sub(r"<image>\s*", "", str(r["question"])).strip()
    return make_row(
        question=question,
        answer=strip_boxed(str(r["answer"])),
        images=images,
        data_source="virl39k",
        answer_kind=answer_kind(str(r["answer"])),
        index=index,
        uid=str(r.get("qid", index)),
        category=_category(r),
        protocol=protocol,
    )


def _looks_like_path(source: str) -> bool:
    """A hub id is ``owner/name``; anything with a leading ``/ . ~``, a data-file suffix or more than
    one ``/`` is meant as a local path (so a typo in it is reported as missing, not sent to the hub).

    >>> [_looks_like_path(s) for s in ("xl-opt/ViRL39K", "./virl", "/data/virl", "virl.jsonl", "a/b/c")]
    [False, True, True, True, True]
    """
    return (
        source.startswith(("/", ".", "~"))
        or source.endswith((".parquet", ".jsonl", ".json"))
        or source.count("/") > 1
        or "\\" in source
    )


def prepare_virl(
    source: str | Path | None,
    out_dir: Path,
    n: int = 12_000,
    val_size: int = 500,
    seed: int = 0,
    keep_extremes: bool = False,
    protocol: str = "decoupled",
) -> dict[str, Any]:
    """Write ``train.parquet``, ``val.parquet`` and ``manifest.json`` to ``out_dir``; returns the manifest."""
    from tqdm import tqdm

    from vlcal_verl.data.schema import ParquetRowWriter, write_manifest

    if source is not None and (Path(source).exists() or _looks_like_path(str(source))):
        it, root = read_local(Path(source))  # a missing path is a FileNotFoundError naming it
    else:
        it, root = read_hub(BenchSpec(str(source or HUB_ID), "train", lambda r, p: r)), None
    records = list(it)  # text fields and image paths only: small
    chosen = sample_indices(records, n + val_size, seed=seed, keep_extremes=keep_extremes)
    out_dir = Path(out_dir)
    # rows carry PNG bytes: stream them to the files (val = the first val_size, then train) so memory
    # holds one batch, not 12K images
    n_val = min(val_size, len(chosen))
    if len(chosen) <= n_val:
        raise ValueError(
            f"{len(chosen)} items left after filtering: none for train after --val-size {val_size}"
        )
    categories: Counter[str] = Counter()
    val_file = ParquetRowWriter(out_dir / "val.parquet") if n_val else contextlib.nullcontext()
    with ParquetRowWriter(out_dir / "train.parquet") as train_writer, val_file as val_writer:
        for k, i in enumerate(tqdm(chosen, desc="ViRL rows")):
            row = to_row(records[i], k, root, protocol)
            if k < n_val:
                val_writer.write(row)
            else:
                train_writer.write(row)
                categories[row["extra_info"]["category"]] += 1
    manifest: dict[str, Any] = {
        "source": str(source or HUB_ID),
        "rule": "drop PassRate_72BTrained in {0,1}; category-proportional seeded sample; resize to pixel bounds",
        "seed": seed,
        "source_records": len(records),
        "train": train_writer.rows,
        "val": n_val,
        "categories": dict(sorted(categories.items())),
        "sha256": {"train.parquet": train_writer.sha256}
        | ({"val.parquet": val_writer.sha256} if n_val else {}),
    }
    write_manifest(out_dir, manifest)
    return manifest
