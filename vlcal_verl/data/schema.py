"""The one parquet row schema every training set and benchmark is written in (verl 0.9.1 ``RLHFDataset``).

verl reads ``prompt`` (a chat list whose user content holds one ``<image>`` placeholder per image),
``images`` (a list of ``{"bytes": PNG}`` dicts, its ``image_key``), ``data_source``, ``ability``,
``reward_model`` (``{"style": "rule", "ground_truth": ...}``) and ``extra_info`` (handed to the reward
function). ``extra_info.answer_kind`` is the grading kind (math | multiple_choice | yes_no) that
``grading.grade_answer`` receives, so training and evaluation grade an item the same way.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

ANSWER_KINDS = ("math", "multiple_choice", "yes_no")
ROW_KEYS = ("data_source", "prompt", "images", "ability", "reward_model", "extra_info")
EXTRA_KEYS = ("index", "uid", "category", "answer_kind", "question", "unanswerable")
MIN_PIXELS = 262_144  # docs/design.md §6: 512×512
MAX_PIXELS = 4_194_304  # 2048×2048


def image_entry(image: Image.Image) -> dict[str, bytes]:
    """PIL image → ``{"bytes": PNG}`` (what verl's ``process_image`` opens)."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return {"bytes": buf.getvalue()}


def blank_like(image: Image.Image) -> Image.Image:
    """White image of the same size: the 'image removed' (unanswerable) variant keeps the token count."""
    return Image.new("RGB", image.size, (255, 255, 255))


def fit_pixels(image: Image.Image, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Resize (aspect kept) so that width×height lies in [min_pixels, max_pixels]; unchanged if it already does."""
    w, h = image.size
    area = w * h
    if min_pixels <= area <= max_pixels:
        return image
    scale = ((min_pixels if area < min_pixels else max_pixels) / area) ** 0.5
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    if new[0] * new[1] > max_pixels:  # rounding up may overshoot
        new = (max(1, int(w * scale)), max(1, int(h * scale)))
    return image.resize(new, Image.Resampling.BICUBIC)


def prompt_text(question: str, protocol: str = "decoupled", n_images: int = 1) -> str:
    """The user turn as a verl row stores it: one ``<image>`` per image, a newline, the instructions."""
    from vlcal_verl.protocol import build_prompt

    return "<image>" * n_images + "\n" + build_prompt(question, protocol)


def chat_messages(question: str, protocol: str = "decoupled", n_images: int = 1) -> list[dict[str, Any]]:
    """The chat messages verl's ``RLHFDataset`` builds from :func:`prompt_text` (images first, then the
    text after the placeholders), so the warm start and ``vlcal eval`` prompt exactly as training does."""
    text = prompt_text(question, protocol, n_images).split("<image>")[-1]
    return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}]


def make_row(
    *,
    question: str,
    answer: str,
    images: Sequence[Image.Image],
    data_source: str,
    answer_kind: str,
    index: int,
    uid: str,
    category: str = "",
    ability: str = "visual_reasoning",
    protocol: str = "decoupled",
    unanswerable: bool = False,
) -> dict[str, Any]:
    """One verl row: ``<image>`` placeholders first, then the protocol instructions around ``question``."""
    if answer_kind not in ANSWER_KINDS:
        raise ValueError(f"answer_kind must be one of {ANSWER_KINDS}, got {answer_kind!r} (uid {uid})")
    if unanswerable:
        images = [blank_like(im) for im in images]
        uid = unanswerable_uid(uid)
    content = prompt_text(question, protocol, len(images))
    return {
        "data_source": data_source + ("-unanswerable" if unanswerable else ""),
        "prompt": [{"role": "user", "content": content}],
        "images": [image_entry(im) for im in images],
        "ability": ability,
        "reward_model": {"style": "rule", "ground_truth": str(answer)},
        "extra_info": {
            "index": int(index),
            "uid": str(uid),
            "category": str(category or ""),
            "answer_kind": answer_kind,
            "question": question,
            "unanswerable": bool(unanswerable),
        },
    }


UNANSWERABLE_UID_SUFFIX = "#unanswerable"


def unanswerable_uid(uid: str) -> str:
    """The uid of an item's image-removed copy: the item's uid + ``#unanswerable`` (idempotent), so the
    pair is easy to match and the two never collide in judgments or reports.

    >>> unanswerable_uid("mathvista/12/11"), unanswerable_uid("a#unanswerable")
    ('mathvista/12/11#unanswerable', 'a#unanswerable')
    """
    uid = str(uid)
    return uid if uid.endswith(UNANSWERABLE_UID_SUFFIX) else uid + UNANSWERABLE_UID_SUFFIX


def validate_row(row: Mapping[str, Any], where: str = "row") -> None:
    """Raise ``ValueError`` naming the field when ``row`` does not follow the schema."""
    for key in ROW_KEYS:
        if key not in row:
            raise ValueError(f"{where}: missing field {key!r}")
    prompt = row["prompt"]
    if not (isinstance(prompt, list | tuple) and prompt and all(isinstance(m, Mapping) for m in prompt)):
        raise ValueError(f"{where}: field 'prompt' must be a non-empty list of chat messages")
    text = "".join(str(m.get("content", "")) for m in prompt)
    n_images = len(row["images"])
    if text.count("<image>") != n_images:
        raise ValueError(
            f"{where}: field 'prompt' has {text.count('<image>')} <image> but 'images' has {n_images}"
        )
    for j, im in enumerate(row["images"]):
        if not (isinstance(im, Mapping) and isinstance(im.get("bytes"), bytes | bytearray) and im["bytes"]):
            raise ValueError(f"{where}: field 'images[{j}]' must be {{'bytes': <encoded image>}}")
    rm = row["reward_model"]
    if not (
        isinstance(rm, Mapping) and rm.get("style") == "rule" and isinstance(rm.get("ground_truth"), str)
    ):
        raise ValueError(f"{where}: field 'reward_model' must be {{'style': 'rule', 'ground_truth': str}}")
    extra = row["extra_info"]
    for key in EXTRA_KEYS:
        if not isinstance(extra, Mapping) or key not in extra:
            raise ValueError(f"{where}: missing field 'extra_info.{key}'")
    if extra["answer_kind"] not in ANSWER_KINDS:
        raise ValueError(f"{where}: field 'extra_info.answer_kind' must be one of {ANSWER_KINDS}")


def validate_rows(rows: Sequence[Mapping[str, Any]]) -> None:
    """Validate every row and that ``extra_info.uid`` is unique."""
    seen: set[str] = set()
    for i, row in enumerate(rows):
        validate_row(row, where=f"row {i}")
        uid = row["extra_info"]["uid"]
        if uid in seen:
            raise ValueError(f"row {i}: duplicate 'extra_info.uid' {uid!r}")
        seen.add(uid)


def write_parquet(rows: Sequence[Mapping[str, Any]], path: str | Path) -> str:
    """Validate and write ``rows`` to ``path``; returns the file's sha256."""
    with ParquetRowWriter(path) as writer:
        for row in rows:
            writer.write(row)
    return writer.sha256


class ParquetRowWriter:
    """Validate rows and append them to one parquet file ``batch_rows`` at a time, so that memory stays
    bounded by a batch however many rows (each with its PNG bytes) are written; uids must be unique
    across the whole file. ``sha256`` is set on close. On an exception the partial file is removed.

    >>> import tempfile
    >>> from PIL import Image
    >>> path = Path(tempfile.mkdtemp()) / "x.parquet"
    >>> with ParquetRowWriter(path, batch_rows=1) as w:
    ...     for i in range(3):
    ...         w.write(make_row(question="q", answer="1", images=[Image.new("RGB", (28, 28))],
    ...                          data_source="d", answer_kind="math", index=i, uid=f"u{i}"))
    >>> [r["extra_info"]["uid"] for r in read_parquet(path)], w.rows
    (['u0', 'u1', 'u2'], 3)
    """

    def __init__(self, path: str | Path, batch_rows: int = 256) -> None:
        if batch_rows < 1:
            raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
        self.path, self.batch_rows = Path(path), batch_rows
        self.rows, self.sha256 = 0, ""
        self._buffer: list[Mapping[str, Any]] = []
        self._uids: set[str] = set()
        self._writer: Any = None

    def write(self, row: Mapping[str, Any]) -> None:
        where = f"row {self.rows + len(self._buffer)}"
        validate_row(row, where=where)
        uid = row["extra_info"]["uid"]
        if uid in self._uids:
            raise ValueError(f"{where}: duplicate 'extra_info.uid' {uid!r}")
        self._uids.add(uid)
        self._buffer.append(row)
        if len(self._buffer) >= self.batch_rows:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self._buffer:
            return
        if self._writer is None:  # the first batch fixes the schema; later ones are cast to it
            table = pa.Table.from_pylist(self._buffer)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = pq.ParquetWriter(self.path, table.schema)
        else:
            table = pa.Table.from_pylist(self._buffer, schema=self._writer.schema)
        self._writer.write_table(table)
        self.rows += len(self._buffer)
        self._buffer.clear()

    def close(self) -> str:
        """Write what is buffered, close the file and return its sha256."""
        self._flush()
        if self._writer is None:
            raise ValueError(f"{self.path}: no rows to write")
        self._writer.close()
        digest = hashlib.sha256()
        with open(self.path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        self.sha256 = digest.hexdigest()
        return self.sha256

    def __enter__(self) -> ParquetRowWriter:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None:
            self.close()
            return
        if self._writer is not None:
            self._writer.close()
        self.path.unlink(missing_ok=True)


def read_parquet(path: str | Path) -> list[dict[str, Any]]:
    """Rows back as plain Python objects (lists, dicts, bytes)."""
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def write_manifest(out_dir: Path, info: Mapping[str, Any]) -> Path:
    path = Path(out_dir) / "manifest.json"
    path.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path
