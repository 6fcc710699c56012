"""benchmarks/warm_start_dev.py: fit is the recipe's training items, dev shows only images fit never shows, no\nheld-out item is read, and its settings parse."""

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
        return _items(split, limit)  # one image for all: a fake pool with no new image after fit

    monkeypatch.setattr(easy_vqa, "load_easy_vqa", fake)
    with pytest.raises(ValueError, match="only 0 of the 600 items after fit show a new image; 200 needed"):
        bench.fit_dev_items(1024, 0, 96)
    assert calls == [("train", 1024 + 600, False)]


def test_settings_parse_over_the_defaults_and_name_the_changes(benchmark_script):
    bench = benchmark_script("warm_start_dev")
    defaults = {"steps": 2000, "lr": 3e-3, "batch": 8, "image_size": 128, "rlcr_fraction": 0.5}
    defaults |= {"vision_depth": 0, "vision_width": 0, "init_seed": 0}
    s = bench.parse_setting("steps=500, image_size=64,lr=1e-2", defaults)
    assert s == {**defaults, "steps": 500, "image_size": 64, "lr": 0.01}
    assert bench.label(s, defaults) == "500 steps, lr 0.01, image_size 64"
    with pytest.raises(ValueError, match="unknown setting key 'depth'"):
        bench.parse_setting("depth=4", defaults)
