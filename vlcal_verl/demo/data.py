"""Demo data: easy-vqa prompts in the decoupled protocol, and the warm start's templated targets.

A random tiny model never writes the protocol, so GRPO would see equal rewards and zero advantages.
The warm start (``warm_start.py``) therefore trains on *protocol-formatted targets built from the data*:

    <think><vision>The image shows a blue rectangle.</vision><reasoning>…so the answer is no.</reasoning></think>
    \\boxed{no}
    <analysis>…</analysis>
    <confidence><vision_confidence>c_v</vision_confidence><reasoning_confidence>c_r</reasoning_confidence></confidence>

- z_vis is *true*: the shape's colour and kind are read off the image pixels (easy-vqa draws one shape of
  a fixed palette colour on a light background; the fill ratio of its bounding box separates triangles
  ≈0.57, circles ≈0.80 and rectangles ≈1.0), so the vision span describes the picture, not the question.
- z_reas is a one-line deduction from z_vis to the answer (also for the negated yes/no questions).
- c_v and c_r are *uninformative*: independent integers drawn uniformly from ``CONFIDENCE_RANGE``, seeded
  per target. The warm start thus teaches the format and a spread-out confidence prior (so sampling at
  temperature 1 explores different confidences), but no calibration: which confidence goes with which
  question is left for the RL rewards (Brier on Φ, visual term on c_v) to teach.

``rlcr_target`` writes the same content in the RLCR baseline's layout (one ``<confidence>``; z_vis and
z_reas as the two sentences of ``<think>``): a warm start that teaches both layouts (``DemoConfig.
warm_start_rlcr_fraction``) lets the RLCR baseline start from the very model the full method starts from.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# easy-vqa's palette (RGB) — measured from the package's images
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "teal": (0, 128, 128),
    "brown": (165, 42, 42),
    "yellow": (255, 255, 0),
}
SHAPES = ("circle", "rectangle", "triangle")
CONFIDENCE_RANGE = (2, 9)
"""Inclusive range of the warm start's random confidence targets (0..10 scale)."""

_COLOR = "|".join(PALETTE)
_SHAPE = "|".join(SHAPES)


@dataclass(frozen=True)
class ImageFacts:
    """What the image shows: the shape's palette colour and kind (None when unreadable, e.g. blank)."""

    color: str | None
    shape: str | None

    def describe(self) -> str:
        """The templated z_vis, e.g. 'The image shows a blue rectangle.'"""
        if self.color is None and self.shape is None:
            return "The image shows no shape."
        return f"The image shows a {self.color or ''} {self.shape or 'shape'}.".replace("  ", " ")


def image_facts(image: Any) -> ImageFacts:
    """Read (colour, shape) off an easy-vqa image (PIL); background = the corner pixels' colour."""
    arr = np.asarray(image.convert("RGB")).astype(np.int32)
    corners = np.stack([arr[0, 0], arr[0, -1], arr[-1, 0], arr[-1, -1]])
    bg = np.median(corners, axis=0)
    fg = np.abs(arr - bg).sum(-1) > 60
    if fg.sum() < 8:
        return ImageFacts(None, None)
    pixels = Counter(map(tuple, arr[fg].tolist())).most_common(1)[0][0]
    color = min(PALETTE, key=lambda c: sum((a - b) ** 2 for a, b in zip(PALETTE[c], pixels, strict=True)))
    ys, xs = np.nonzero(fg)
    fill = fg.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    shape = "triangle" if fill < 0.68 else "circle" if fill < 0.93 else "rectangle"
    return ImageFacts(color, shape)


def reasoning_for(question: str, answer: str, facts: ImageFacts) -> str:
    """The templated z_reas: one deduction from z_vis to the (ground-truth) answer."""
    q = question.lower()
    negated = bool(re.search(r"\bnot\b|\bno\b", q))
    asked_color = re.search(rf"\b({_COLOR})\b", q)
    asked_shape = re.search(rf"\b({_SHAPE})\b", q)
    if answer in ("yes", "no"):
        thing = (
            f"a {asked_color.group(1)} shape"
            if asked_color
            else f"a {asked_shape.group(1) if asked_shape else 'shape'}"
        )
        present = (answer == "yes") != negated
        there = "is there" if present else "is not there"
        ask = "if it is not" if negated else "if it is"
        return f"{thing.capitalize()} {there}; the question asks {ask}, so the answer is {answer}."
    if answer in PALETTE:
        return f"The shape is {answer}, so its color is {answer}."
    return f"The shape is a {answer}, so the answer is {answer}."


def analysis_for(c_v: int, c_r: int) -> str:
    """The templated analysis, worded after the target confidences."""
    see = "clear" if c_v >= 6 else "unclear"
    step = "simple" if c_r >= 6 else "unsure"
    return f"The shape looks {see}; the step is {step}."


def warm_start_target(question: str, answer: str, facts: ImageFacts, rng: random.Random) -> str:
    """A full protocol-formatted response for one (question, answer, image) with random c_v, c_r."""
    c_v = rng.randint(*CONFIDENCE_RANGE)
    c_r = rng.randint(*CONFIDENCE_RANGE)
    return (
        f"<think><vision>{facts.describe()}</vision>"
        f"<reasoning>{reasoning_for(question, answer, facts)}</reasoning></think>\n"
        f"\\boxed{{{answer}}}\n"
        f"<analysis>{analysis_for(c_v, c_r)}</analysis>\n"
        f"<confidence><vision_confidence>{c_v}</vision_confidence>"
        f"<reasoning_confidence>{c_r}</reasoning_confidence></confidence>"
    )


def rlcr_target(question: str, answer: str, facts: ImageFacts, rng: random.Random) -> str:
    """The same response in the RLCR layout: ``<think>`` z_vis z_reas ``</think>``, the box, an analysis and
    one random confidence ``c`` (drawn like c_v and c_r: uninformative)."""
    c = rng.randint(*CONFIDENCE_RANGE)
    sure = "sure" if c >= 6 else "unsure"
    return (
        f"<think>{facts.describe()} {reasoning_for(question, answer, facts)}</think>\n"
        f"\\boxed{{{answer}}}\n"
        f"<analysis>The answer looks {sure}.</analysis>\n"
        f"<confidence>{c}</confidence>"
    )


@dataclass
class DemoData:
    """Train items, held-out items and their unanswerable (blank-image) copies."""

    train: list[Any]
    eval: list[Any]
    unanswerable: list[Any]


def resized(items: list[Any], size: int) -> list[Any]:
    """Copies of the items with the image resized (nearest: palette colours stay exact) to size × size."""
    if not size:
        return list(items)
    from PIL import Image

    return [dataclasses.replace(it, image=it.image.resize((size, size), Image.NEAREST)) for it in items]


def load_demo_data(train_size: int, eval_size: int, seed: int, image_size: int = 0) -> DemoData:
    """Load easy-vqa through ``vlcal_verl.data.easy_vqa`` (train split for RL, test split held out)."""
    from vlcal_verl.data.easy_vqa import load_easy_vqa

    train = load_easy_vqa("train", limit=train_size, seed=seed)
    held = load_easy_vqa("test", limit=eval_size, seed=seed) if eval_size else []
    blank = load_easy_vqa("test", limit=eval_size, seed=seed, unanswerable=True) if eval_size else []
    return DemoData(*(resized(x, image_size) for x in (train, held, blank)))


def split_unseen_images(items: list[Any], fit: int, n: int) -> tuple[list[Any], list[Any]]:
    """(``items[:fit]``, the first ``n`` items after them whose image no item of ``items[:fit]`` shows).

    easy-vqa asks several questions about each image, so an item after the training items may show a
    training image; those are skipped, and what is left judges sight, not memory. ValueError if an item
    is not a training-split one (a held-out item must never reach a dev set) or too few are left."""
    wrong = [it.uid for it in items if not str(it.uid).startswith("easy-vqa/train/")]
    if wrong:
        raise ValueError(f"not training-split items: {wrong[:3]}")
    fit_items = list(items[:fit])
    seen = {it.image.tobytes() for it in fit_items}
    unseen = [it for it in items[fit:] if it.image.tobytes() not in seen][:n]
    if len(unseen) < n:
        raise ValueError(
            f"only {len(unseen)} of the {len(items) - fit} items after fit show a new image; {n} needed"
        )
    return fit_items, unseen


def load_dev_data(train_size: int, n: int, seed: int, image_size: int = 0) -> DemoData:
    """The training items (as :func:`load_demo_data` loads them) and a dev set from the *training* split:
    the ``n`` items after them in the same seeded order whose image no training item shows, and their
    blank-image twins (``eval`` / ``unanswerable``, as the held-out pair). easy-vqa's test split is not
    read: a dev set is for choosing settings, the held-out items for reporting them."""
    from PIL import Image

    from vlcal_verl.data.easy_vqa import BLANK_COLOR, UNANSWERABLE_SOURCE, load_easy_vqa
    from vlcal_verl.data.schema import unanswerable_uid

    # a prefix order: pool[:train_size] are load_demo_data's training items
    pool = load_easy_vqa("train", limit=train_size + 3 * n, seed=seed)
    train, dev = split_unseen_images(pool, train_size, n)
    blank = [
        dataclasses.replace(
            it,
            uid=unanswerable_uid(it.uid),
            image=Image.new("RGB", it.image.size, BLANK_COLOR),
            data_source=UNANSWERABLE_SOURCE,
        )
        for it in dev
    ]
    return DemoData(*(resized(x, image_size) for x in (train, dev, blank)))


def user_message(question: str, protocol: str = "decoupled") -> list[dict[str, Any]]:
    """The chat messages of one prompt, exactly as verl builds them from the parquet row."""
    from vlcal_verl.data.schema import chat_messages

    return chat_messages(question, protocol, 1)


HELDOUT = "easy-vqa-heldout"
"""Benchmark name of the held-out parquet (``vlcal eval --bench``); its image-removed copy adds
``-unanswerable``."""
DEV = "easy-vqa-dev"
"""Benchmark name of a dev set from the training split (:func:`load_dev_data`), with its ``-unanswerable``
twin: what a science run evaluates with ``science.evaluate_on: dev``."""


def write_demo_parquets(data: DemoData, out_dir: Path, eval_name: str = HELDOUT) -> dict[str, Path]:
    """verl parquet files of the demo data (``data.schema`` rows, the images as resized):

    ``train.parquet`` (GRPO prompts), ``easy-vqa-heldout.parquet`` (verl's validation set and the
    evaluation benchmark) and ``easy-vqa-heldout-unanswerable.parquet`` (the same with blank images);
    ``eval_name`` names the evaluation pair (:data:`DEV` for a dev set). Files of empty lists are not
    written; existing files are kept (``--resume`` reuses them).
    """
    from vlcal_verl.data.easy_vqa import to_verl_rows
    from vlcal_verl.data.schema import write_parquet

    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "train": (out_dir / "train.parquet", data.train),
        "heldout": (out_dir / f"{eval_name}.parquet", data.eval),
        "unanswerable": (out_dir / f"{eval_name}-unanswerable.parquet", data.unanswerable),
    }
    for path, items in files.values():
        if items and not path.exists():
            write_parquet(to_verl_rows(items), path)
    return {name: path for name, (path, items) in files.items() if items}
