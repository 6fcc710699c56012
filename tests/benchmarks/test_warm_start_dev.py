"""benchmarks/warm_start_dev.py: its fit/dev split reads the training split only, and its settings parse."""

from __future__ import annotations

import pytest
from PIL import Image

from vlcal_verl.data.easy_vqa import VQAItem


def _items(split: str, n: int) -> list[VQAItem]:
    image = Image.new("RGB", (64, 64), (255, 255, 255))
    return [
        VQAItem(f"easy-vqa/{split}/{i}", "What shape?", "circle", image, "math", "easy-vqa") for i in range(n)
    ]


def test_fit_dev_items_never_load_the_test_split(monkeypatch, benchmark_script):
    import vlcal_verl.data.easy_vqa as easy_vqa

    bench = benchmark_script("warm_start_dev")
    calls = []

    def fake(split="train", limit=None, seed=0, unanswerable=False):
        calls.append((split, limit, unanswerable))
        return _items(split, limit)

    monkeypatch.setattr(easy_vqa, "load_easy_vqa", fake)
    fit, dev = bench.fit_dev_items(1024, 0, 96)
    assert calls == [("train", 1024, False)]
    assert (len(fit), len(dev)) == (824, 200)
    assert {it.uid for it in fit}.isdisjoint(it.uid for it in dev)
    assert dev[-1].uid == "easy-vqa/train/1023" and fit[0].image.size == (96, 96)


def test_fit_dev_split_refuses_held_out_items_and_overlap(benchmark_script):
    bench = benchmark_script("warm_start_dev")
    with pytest.raises(ValueError, match="not training-split"):
        bench.fit_dev_split(_items("train", 1000) + _items("test", 24))
    with pytest.raises(ValueError, match="> 1000 items"):
        bench.fit_dev_split(_items("train", 1000))


def test_settings_parse_over_the_defaults_and_name_the_changes(benchmark_script):
    bench = benchmark_script("warm_start_dev")
    defaults = {"steps": 2000, "lr": 3e-3, "batch": 8, "image_size": 128, "rlcr_fraction": 0.5}
    defaults |= {"vision_depth": 0, "vision_width": 0}
    s = bench.parse_setting("steps=500, image_size=64,lr=1e-2", defaults)
    assert s == {**defaults, "steps": 500, "image_size": 64, "lr": 0.01}
    assert bench.label(s, defaults) == "500 steps, lr 0.01, image_size 64"
    with pytest.raises(ValueError, match="unknown setting key 'depth'"):
        bench.parse_setting("depth=4", defaults)


def test_more_training_items_add_to_fit_but_never_show_a_dev_image(benchmark_script):
    bench = benchmark_script("warm_start_dev")
    # image value: i % 50 for the first 1,024 items (dev, items 824-1023, shows all 50); after them
    # 48-51, of which 48 and 49 are dev images
    values = [i % 50 if i < 1024 else 48 + i % 4 for i in range(1100)]
    items = [
        VQAItem(
            f"easy-vqa/train/{i}", "What shape?", "circle", Image.new("RGB", (8, 8), (v, 0, 0)), "math", "x"
        )
        for i, v in enumerate(values)
    ]
    fit, dev = bench.fit_dev_split(items)
    assert dev == items[824:1024] and fit[:824] == items[:824]
    assert fit[824:] == [it for it, v in zip(items[1024:], values[1024:], strict=True) if v >= 50]
    assert len(fit) == 824 + 38
