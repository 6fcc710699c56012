"""A dev set from easy-vqa's training split (``science.evaluate_on: dev``): the items after the training
items whose image no training item shows, with blank-image twins; the test split is never read."""

from __future__ import annotations

import functools

import easy_vqa
import pytest

from vlcal_verl.data.easy_vqa import BLANK_COLOR, UNANSWERABLE_SOURCE, VQAItem
from vlcal_verl.demo.data import DEV, load_demo_data, load_dev_data, split_unseen_images, write_demo_parquets


@functools.lru_cache(maxsize=1)
def _train_image_ids() -> list[int]:
    return list(easy_vqa.get_train_questions()[2])


def _image_id(uid: str) -> int:
    """The easy-vqa image id of a train-split item uid, from the package's own question table."""
    return _train_image_ids()[int(uid.split("/")[2].split("#")[0])]


@pytest.fixture(scope="module")
def dev_data():
    return load_dev_data(40, 12, seed=3, image_size=32)


def test_dev_items_follow_the_training_items_and_show_only_images_they_never_show(dev_data):
    train, dev = dev_data.train, dev_data.eval
    assert [it.uid for it in train] == [it.uid for it in load_demo_data(40, 0, 3, 32).train]
    assert len(dev) == 12 and all(it.uid.startswith("easy-vqa/train/") for it in dev)
    train_images = {_image_id(it.uid) for it in train}
    assert not {_image_id(it.uid) for it in dev} & train_images  # by the package's image ids, not pixels
    # the first 12 of the later items with a new image, in the seeded order (brute force over the order)
    import random

    image_ids = _train_image_ids()
    order = list(range(len(image_ids)))
    random.Random(3).shuffle(order)
    expected = [i for i in order[40:] if image_ids[i] not in train_images][:12]
    assert [it.uid for it in dev] == [f"easy-vqa/train/{i}" for i in expected]


def test_twins_are_the_dev_items_with_a_blank_image(dev_data):
    for item, twin in zip(dev_data.eval, dev_data.unanswerable, strict=True):
        assert twin.uid == item.uid + "#unanswerable" and twin.data_source == UNANSWERABLE_SOURCE
        assert (twin.question, twin.answer, twin.kind) == (item.question, item.answer, item.kind)
        assert twin.image.size == item.image.size == (32, 32)
        assert set(twin.image.getdata()) == {BLANK_COLOR}


def test_the_test_split_is_never_read(monkeypatch):
    import vlcal_verl.data.easy_vqa as module

    real, splits = module.load_easy_vqa, []

    def spy(split="train", **kw):
        splits.append(split)
        return real(split, **kw)

    monkeypatch.setattr(module, "load_easy_vqa", spy)
    load_dev_data(20, 4, seed=0)
    assert splits == ["train"]


def test_dev_parquets_are_named_for_the_dev_pair(dev_data, tmp_path):
    from vlcal_verl.data.schema import read_parquet

    written = write_demo_parquets(dev_data, tmp_path, eval_name=DEV)
    assert written["heldout"] == tmp_path / "easy-vqa-dev.parquet"
    assert written["unanswerable"] == tmp_path / "easy-vqa-dev-unanswerable.parquet"
    rows = read_parquet(written["unanswerable"])
    assert [r["extra_info"]["unanswerable"] for r in rows] == [True] * 12
    assert not (tmp_path / "easy-vqa-heldout.parquet").exists()


def _item(i: int, value: int, split: str = "train") -> VQAItem:
    from PIL import Image

    return VQAItem(
        f"easy-vqa/{split}/{i}", "What shape?", "circle", Image.new("RGB", (8, 8), (value, 0, 0)), "math", "x"
    )


def test_split_keeps_fit_and_takes_the_first_items_with_a_new_image():
    # image value i % 50 for the first 30 items (fit shows 0-29); after them 20-39 repeating, 30-39 new
    values = [i % 50 for i in range(30)] + [20 + i % 20 for i in range(60)]
    items = [_item(i, v) for i, v in enumerate(values)]
    fit, dev = split_unseen_images(items, 30, 25)
    assert fit == items[:30]
    assert dev == [it for it, v in zip(items[30:], values[30:], strict=True) if v >= 30][:25]
    with pytest.raises(ValueError, match="only 30 of the 60 items after fit show a new image; 31 needed"):
        split_unseen_images(items, 30, 31)
    with pytest.raises(ValueError, match="not training-split items"):
        split_unseen_images([*items, _item(99, 7, "test")], 30, 5)
