"""Benchmark adapters: each evaluation set → the one verl row schema, with a grading kind per item.

A benchmark is a ``BenchSpec`` in ``REGISTRY`` (name → spec): its hub id and split, and a ``convert``
function from one raw record (the hub's own field names) to ``(question, answer, images, answer_kind,
category)``. Sources are read from a local copy (``--source``: a folder or file of parquet / JSONL / JSON
in the hub's format, image fields as ``{"bytes"|"path"}`` dicts or paths relative to the folder) or from
the hub with ``datasets.load_dataset`` when it is reachable. Multiple-choice questions get their options
written as ``A. ...`` lines and a letter as the answer, so ``grading`` compares letters.
"""

from __future__ import annotations

import ast
import io
import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

LETTERS = "ABCDEFGHIJKLMNOP"
Converted = tuple[str, str, list[Image.Image], str, str]


@dataclass(frozen=True)
class BenchSpec:
    """Where a benchmark lives and how one raw record becomes (question, answer, images, kind, category)."""

    hub_id: str
    split: str
    convert: Callable[[Mapping[str, Any], Path | None], Converted]
    config: str | None = None
    keep: Callable[[Mapping[str, Any]], bool] = lambda r: True


def load_image(value: Any, root: Path | None, field: str) -> Image.Image:
    """An image field as the hub stores it (PIL, ``{"bytes"}``, ``{"path"}``, path string) → RGB PIL."""
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, Mapping):
        if value.get("bytes"):
            return Image.open(io.BytesIO(value["bytes"])).convert("RGB")
        value = value.get("path")
    if isinstance(value, str) and value:
        path = Path(value)
        if not path.is_absolute() and root is not None:
            path = root / path
        if not path.exists():
            raise FileNotFoundError(
                f"field {field!r}: image file {path} not found (is the image folder there?)"
            )
        with Image.open(path) as im:
            return im.convert("RGB")
    raise ValueError(f"field {field!r}: no image (got {type(value).__name__})")


def with_options(question: str, options: list[str]) -> str:
    lines = [f"{LETTERS[i]}. {o}" for i, o in enumerate(options)]
    return question.rstrip() + "\nOptions:\n" + "\n".join(lines)


def _options(value: Any) -> list[str]:
    if isinstance(value, str):
        value = ast.literal_eval(value) if value.strip().startswith("[") else [value]
    return [str(v) for v in (value or [])]


def _math_or_mc(answer: str) -> str:
    return "multiple_choice" if answer.strip().upper() in LETTERS and len(answer.strip()) == 1 else "math"


# --- converters: one per source format (hub field names) ----------------------------------------------------


def _mathvista(r, root):
    choices = _options(r.get("choices"))
    q = r["question"]
    ans = str(r["answer"])
    if r.get("question_type") == "multi_choice" and choices:
        return (
            with_options(q, choices),
            LETTERS[choices.index(ans)],
            [_img(r, root, "decoded_image", "image")],
            "multiple_choice",
            str(r.get("metadata", {}).get("category", "")) if isinstance(r.get("metadata"), Mapping) else "",
        )
    return q, ans, [_img(r, root, "decoded_image", "image")], "math", ""


def _img(r, root, *fields):
    for f in fields:
        if r.get(f):
            return load_image(r[f], root, f)
    raise ValueError(f"none of the image fields {fields} is set")


# MathVerse's query_cot opens with its own answer-format instruction ("... provide the final value,
# e.g., 1, 2.5, 300, at the end.", "... e.g., The answer is xxx"), which contradicts the protocol's
# \boxed{} and confidence layout; the instruction line and the "Question:" label are dropped.
_COT_INSTRUCTION_RE = re.compile(
    r"^\s*(?:According to the question shown in the image, )?please first (?:conduct|perform) reasoning[^\n]*"
    r"(?:\n|$)\s*(?:Question:\s*)?",
    re.IGNORECASE,
)


def strip_cot_instruction(query: str) -> str:
    """A MathVerse ``query_cot`` without its leading answer-format instruction.

    >>> strip_cot_instruction("Please first conduct reasoning, and then answer the question and provide "
    ...     "the final value, e.g., 1, 2.5, 300, at the end.\\nQuestion: Find x.\\nChoices:\\nA:1")
    'Find x.\\nChoices:\\nA:1'
    >>> strip_cot_instruction("Find x.")
    'Find x.'
    """
    stripped = _COT_INSTRUCTION_RE.sub("", query, count=1).strip()
    return stripped or "Answer the question shown in the image."  # Vision Only: the question is drawn


def _mathverse(r, root):
    kind = "multiple_choice" if r.get("question_type") == "multi-choice" else "math"
    q = (
        strip_cot_instruction(r["query_cot"])
        if r.get("query_cot")
        else r.get("question_for_eval") or r["question"]
    )
    return q, str(r["answer"]), [_img(r, root, "image")], kind, str(r.get("problem_version", ""))


def _mathvision(r, root):
    opts = _options(r.get("options"))
    q = with_options(r["question"], opts) if opts else r["question"]
    return (
        q,
        str(r["answer"]),
        [_img(r, root, "decoded_image", "image")],
        _math_or_mc(str(r["answer"])) if opts else "math",
        str(r.get("subject", "")),
    )


def _wemath(r, root):
    q = r["question"] + ("\n" + r["option"] if r.get("option") else "")
    return (
        q,
        str(r["answer"]),
        [_img(r, root, "image_path", "image")],
        "multiple_choice",
        str(r.get("knowledge concept", "")),
    )


def _dynamath(r, root):
    kind = "multiple_choice" if r.get("answer_type") == "multiple choice" else "math"
    return (
        r["question"],
        str(r["ground_truth"]),
        [_img(r, root, "decoded_image", "image")],
        kind,
        str(r.get("subject", "")),
    )


def _logicvista(r, root):
    return (
        r["question"],
        str(r["answer"]),
        [_img(r, root, "image", "imagename")],
        "multiple_choice",
        str(r.get("skill", "")),
    )


def _mmmu(r, root):
    opts = _options(r.get("options"))
    images = [load_image(r[f"image_{i}"], root, f"image_{i}") for i in range(1, 8) if r.get(f"image_{i}")]
    q = r["question"]
    for i in range(1, len(images) + 1):  # the <image> placeholders come first in our prompt
        q = q.replace(f"<image {i}>", f"[image {i}]")
    if opts and r.get("question_type", "multiple-choice") == "multiple-choice":
        return (
            with_options(q, opts),
            str(r["answer"]),
            images,
            "multiple_choice",
            str(r.get("subject", r.get("subfield", ""))),
        )
    return q, str(r["answer"]), images, "math", str(r.get("subfield", ""))


def _mmstar(r, root):
    return (
        r["question"],
        str(r["answer"]),
        [_img(r, root, "image")],
        "multiple_choice",
        str(r.get("category", "")),
    )


def _aokvqa(r, root):
    choices = _options(r["choices"])
    return (
        with_options(r["question"], choices),
        LETTERS[int(r["correct_choice_idx"])],
        [_img(r, root, "image")],
        "multiple_choice",
        "a-okvqa",
    )


def _scienceqa(r, root):
    q = (f"Context: {r['hint']}\n" if r.get("hint") else "") + r["question"]
    return (
        with_options(q, _options(r["choices"])),
        LETTERS[int(r["answer"])],
        [_img(r, root, "image")],
        "multiple_choice",
        str(r.get("subject", "")),
    )


def _hallusion(r, root):
    ans = {"1": "yes", "0": "no"}[str(r["gt_answer"]).strip()]
    return r["question"], ans, [_img(r, root, "image", "filename")], "yes_no", str(r.get("category", ""))


REGISTRY: dict[str, BenchSpec] = {
    "mathvista": BenchSpec("AI4Math/MathVista", "testmini", _mathvista),
    "mathverse": BenchSpec(
        "AI4Math/MathVerse",
        "testmini",
        _mathverse,
        config="testmini",
        keep=lambda r: r.get("problem_version") != "Text Only",
    ),
    "mathvision": BenchSpec("MathLLMs/MathVision", "test", _mathvision),
    "wemath": BenchSpec("We-Math/We-Math", "testmini", _wemath),
    "dynamath": BenchSpec("DynaMath/DynaMath_Sample", "sample_variant1", _dynamath),
    "logicvista": BenchSpec("lscpku/LogicVista", "test", _logicvista),
    "mmmu": BenchSpec("MMMU/MMMU", "validation", _mmmu),
    "mmmu-pro": BenchSpec("MMMU/MMMU_Pro", "test", _mmmu, config="standard (10 options)"),
    "mmstar": BenchSpec("Lin-Chen/MMStar", "val", _mmstar),
    "a-okvqa": BenchSpec("HuggingFaceM4/A-OKVQA", "validation", _aokvqa),
    "scienceqa-img": BenchSpec(
        "derek-thomas/ScienceQA", "test", _scienceqa, keep=lambda r: bool(r.get("image"))
    ),
    "hallusionbench": BenchSpec(
        "lmms-lab/HallusionBench",
        "image",
        _hallusion,
        keep=lambda r: bool(r.get("image") or r.get("filename")),
    ),
}


def read_local(source: Path) -> tuple[Iterator[Mapping[str, Any]], Path]:
    """Records of a local copy: a parquet/JSONL/JSON file, or a folder holding them (images beside)."""
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"--source {source} does not exist")
    files = (
        [source]
        if source.is_file()
        else sorted(
            p
            for p in source.rglob("*")
            if p.suffix in (".parquet", ".jsonl", ".json") and not p.name.endswith("manifest.json")
        )
    )
    if not files:
        raise FileNotFoundError(f"--source {source}: no .parquet/.jsonl/.json file found")
    root = source if source.is_dir() else source.parent

    def records() -> Iterator[Mapping[str, Any]]:
        for f in files:
            if f.suffix == ".parquet":
                import pyarrow.parquet as pq

                yield from pq.read_table(f).to_pylist()
            elif f.suffix == ".jsonl":
                with open(f, encoding="utf-8") as fh:
                    yield from (json.loads(line) for line in fh if line.strip())
            else:
                data = json.loads(f.read_text(encoding="utf-8"))
                yield from (data.values() if isinstance(data, dict) else data)

    return records(), root


def read_hub(spec: BenchSpec) -> Iterator[Mapping[str, Any]]:
    import os

    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise RuntimeError(f"{spec.hub_id}: HF_HUB_OFFLINE=1; download it and pass --source PATH")
    from datasets import load_dataset

    try:
        return iter(load_dataset(spec.hub_id, spec.config, split=spec.split))
    except Exception as err:  # offline / gated / renamed: say what to do
        raise RuntimeError(f"{spec.hub_id} ({spec.split}) not reachable ({err}); pass --source PATH") from err


def _easy_vqa_rows(limit: int | None, seed: int, unanswerable: bool, protocol: str) -> list[dict]:
    from vlcal_verl.data.easy_vqa import load_easy_vqa, to_verl_rows

    return to_verl_rows(load_easy_vqa("test", limit=limit, seed=seed, unanswerable=unanswerable), protocol)


OFFLINE = ("easy-vqa", "easy-vqa-unanswerable")
NAMES = (*REGISTRY, *OFFLINE)


def benchmark_rows(
    name: str,
    source: Path | None = None,
    *,
    limit: int | None = None,
    seed: int = 0,
    unanswerable: bool = False,
    protocol: str = "decoupled",
) -> list[dict]:
    """Rows (``data.schema``) of benchmark ``name``; ``unanswerable`` blanks every image (same size)."""
    from tqdm import tqdm

    from vlcal_verl.data.schema import make_row

    if name in OFFLINE:
        return _easy_vqa_rows(limit, seed, unanswerable or name.endswith("-unanswerable"), protocol)
    if name not in REGISTRY:
        raise ValueError(f"unknown benchmark {name!r}; available: {', '.join(NAMES)}")
    spec = REGISTRY[name]
    records, root = read_local(source) if source else (read_hub(spec), None)
    rows: list[dict] = []
    for i, rec in enumerate(tqdm(records, desc=name, unit="item")):
        if limit is not None and len(rows) >= limit:
            break
        if not spec.keep(rec):
            continue
        try:
            question, answer, images, kind, category = spec.convert(rec, root)
        except (KeyError, ValueError, FileNotFoundError) as err:
            raise ValueError(f"{name} record {i}: {err}") from err
        uid = str(
            rec.get("pid")
            or rec.get("id")
            or rec.get("sample_index")
            or rec.get("ID")
            or rec.get("question_id")
            or rec.get("index")
            or i
        )
        rows.append(
            make_row(
                question=question,
                answer=answer,
                images=images,
                data_source=name,
                answer_kind=kind,
                index=len(rows),
                uid=f"{name}/{uid}/{i}",
                category=category,
                protocol=protocol,
                unanswerable=unanswerable,
            )
        )
    return rows
