"""easy-vqa: real images, questions and answers that ship inside a PyPI package.

The offline data of the demo, the tests and ``vlcal eval --bench easy-vqa``: 4,000 train / 1,000 test
64×64 PNGs of one coloured shape, 38,575 / 9,673 questions with 13 possible answers (colours, shapes,
yes/no). ``unanswerable=True`` swaps each image for a blank one of the same size — the "image removed"
setting whose confidence gap docs/design.md §9 measures.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image

from vlcal_verl.data.schema import unanswerable_uid

DATA_SOURCE = "easy-vqa"
UNANSWERABLE_SOURCE = "easy-vqa-unanswerable"
BLANK_COLOR = (255, 255, 255)
SPLITS = ("train", "test")


@dataclass(frozen=True)
class VQAItem:
    """One question about one image; ``kind`` is the grading kind ('yes_no' or 'math' for words)."""

    uid: str
    question: str
    answer: str
    image: Image.Image
    kind: str
    data_source: str


@lru_cache(maxsize=2)
def _split(split: str) -> tuple[list[tuple[str, str, int]], dict[int, str]]:
    import easy_vqa

    if split == "train":
        texts, answers, image_ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    else:
        texts, answers, image_ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    return list(zip(texts, answers, image_ids, strict=True)), paths


def answer_kind(answer: str) -> str:
    """'yes_no' for yes/no answers, else 'math' (single words graded by exact/equivalent match)."""
    return "yes_no" if answer in ("yes", "no") else "math"


def load_easy_vqa(
    split: str = "train", limit: int | None = None, seed: int = 0, unanswerable: bool = False
) -> list[VQAItem]:
    """Load a seeded subsample of easy-vqa ``split`` ('train' or 'test').

    The same (split, limit, seed) always gives the same items in the same order, with or without
    ``unanswerable`` (so an unanswerable copy pairs item by item with the answerable one; its uid is
    the answerable one's + ``#unanswerable``, see ``data.schema.unanswerable_uid``).

    >>> items = load_easy_vqa("test", limit=2, seed=0)
    >>> len(items), items[0].image.size
    (2, (64, 64))
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    rows, paths = _split(split)
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    if limit is not None:
        order = order[:limit]
    items = []
    for i in order:
        question, answer, image_id = rows[i]
        uid = f"{DATA_SOURCE}/{split}/{i}"
        with Image.open(paths[image_id]) as im:
            image = im.convert("RGB")
        if unanswerable:
            image = Image.new("RGB", image.size, BLANK_COLOR)
        items.append(
            VQAItem(
                uid=unanswerable_uid(uid) if unanswerable else uid,
                question=question,
                answer=answer,
                image=image,
                kind=answer_kind(answer),
                data_source=UNANSWERABLE_SOURCE if unanswerable else DATA_SOURCE,
            )
        )
    return items


def to_verl_rows(items: list[VQAItem], protocol: str = "decoupled") -> list[dict]:
    """easy-vqa items → verl parquet rows (``data.schema``); the blank image is already in the item."""
    from vlcal_verl.data.schema import make_row

    return [
        make_row(
            question=it.question,
            answer=it.answer,
            images=[it.image],
            data_source=DATA_SOURCE,
            answer_kind=it.kind,
            index=i,
            uid=it.uid,
            category="easy-vqa",
            protocol=protocol,
            unanswerable=it.data_source == UNANSWERABLE_SOURCE,
        )
        for i, it in enumerate(items)
    ]
