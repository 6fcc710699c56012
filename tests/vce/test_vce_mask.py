"""Seeded merged-cell masks: determinism, row layout of pixel_values, and agreement with PIL masking."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vlcal_verl.vce_mask import (
    batch_cell_masks,
    black_row,
    black_row_for,
    cell_mask,
    images_per_sample,
    mask_pil_image,
    mask_pil_images,
    mask_pixel_values,
    mask_seed,
    merged_grid_for,
)


def _image(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8"))


def test_same_seed_uid_same_mask_and_different_uid_or_image_differs():
    a = cell_mask(16, 16, 0.8, seed=0, uid="u1", image_index=0)
    assert torch.equal(a, cell_mask(16, 16, 0.8, seed=0, uid="u1", image_index=0))
    assert not torch.equal(a, cell_mask(16, 16, 0.8, seed=0, uid="u2", image_index=0))
    assert not torch.equal(a, cell_mask(16, 16, 0.8, seed=0, uid="u1", image_index=1))
    assert not torch.equal(a, cell_mask(16, 16, 0.8, seed=1, uid="u1", image_index=0))
    # blake2b, not Python's salted hash(): a fixed value across processes
    assert mask_seed(0, "u1", 0) == int.from_bytes(
        __import__("hashlib").blake2b(b"0\x1fu1\x1f0", digest_size=8).digest(), "little"
    )


def test_mask_probability_edges_and_rate():
    assert not cell_mask(8, 8, 0.0, 0, "x", 0).any()
    assert cell_mask(8, 8, 1.0, 0, "x", 0).all()
    rate = cell_mask(100, 100, 0.8, 0, "x", 0).float().mean().item()
    assert abs(rate - 0.8) < 0.02
    with pytest.raises(ValueError, match="mask_prob"):
        cell_mask(2, 2, 1.5, 0, "x", 0)


def test_black_row_is_normalised_zero_per_channel():
    row = black_row([0.5, 0.25, 0.0], [0.5, 0.25, 1.0], temporal_patch_size=2, patch_size=3)
    assert row.shape == (3 * 2 * 3 * 3,)
    assert torch.allclose(row[:18], torch.full((18,), -1.0))
    assert torch.allclose(row[18:36], torch.full((18,), -1.0))
    assert torch.allclose(row[36:], torch.zeros(18))


def test_mask_pixel_values_rows_follow_merge_blocks():
    # two images: 4×4 patches (2×2 cells) and 2×6 patches (1×3 cells), merge 2, rows of width 5
    grid = torch.tensor([[1, 4, 4], [1, 2, 6]])
    pv = torch.arange(28 * 5, dtype=torch.float32).reshape(28, 5)
    black = torch.full((5,), -7.0)
    m1 = torch.tensor([[True, False], [False, True]])
    m2 = torch.tensor([[False, True, False]])
    out = mask_pixel_values(pv, grid, [m1, m2], 2, black)
    masked_rows = {0, 1, 2, 3, 12, 13, 14, 15} | {16 + 4, 16 + 5, 16 + 6, 16 + 7}
    for r in range(28):
        expect = black if r in masked_rows else pv[r]
        assert torch.equal(out[r], expect), r
    assert torch.equal(pv, torch.arange(28 * 5, dtype=torch.float32).reshape(28, 5))  # input untouched
    with pytest.raises(ValueError, match="mask shape"):
        mask_pixel_values(pv, grid, [m2, m1], 2, black)


def test_images_per_sample_and_batch_masks():
    grid = torch.tensor([[1, 4, 4], [1, 2, 2], [1, 4, 2]])  # 4, 1, 2 tokens
    ids = torch.tensor([[9] * 3 + [5] * 4, [5, 9, 5, 5, 9, 9, 9]])
    counts = images_per_sample(ids, grid, image_token_id=5, merge_size=2)
    assert counts == [1, 2]
    masks = batch_cell_masks(grid, counts, ["a", "b"], 0.5, 0, 2)
    assert [tuple(m.shape) for m in masks] == [(2, 2), (1, 1), (2, 1)]
    assert torch.equal(masks[2], cell_mask(2, 1, 0.5, 0, "b", 1))  # image index restarts per sample
    with pytest.raises(ValueError, match="image"):
        images_per_sample(ids[:, :3], grid, 5, 2)


@pytest.mark.parametrize("family,size", [("qwen3-vl", (96, 64)), ("qwen2.5-vl", (84, 56))])
def test_pil_masking_matches_pixel_values_masking(tiny_vlms, family, size):
    _, processor = tiny_vlms[family]
    ip = processor.image_processor
    imgs = [_image(*size, seed=1), _image(size[1], size[1], seed=2)]
    enc = ip(images=imgs, return_tensors="pt")
    assert [merged_grid_for(processor, im) for im in imgs] == [
        (h // 2, w // 2) for _, h, w in enc["image_grid_thw"].tolist()
    ]
    masked_pil = mask_pil_images(processor, imgs, uid="s", p=0.5, seed=3)
    masks = batch_cell_masks(enc["image_grid_thw"], [2], ["s"], 0.5, 3, 2)
    rows = mask_pixel_values(enc["pixel_values"], enc["image_grid_thw"], masks, 2, black_row_for(processor))
    via_pil = ip(images=masked_pil, return_tensors="pt")["pixel_values"]
    assert torch.allclose(rows, via_pil, atol=1e-5)
    changed = (rows != enc["pixel_values"]).any(-1)
    assert changed.sum() == sum(int(m.sum()) * 4 for m in masks) > 0


def test_mask_pil_image_blacks_whole_cells():
    img = Image.new("RGB", (64, 32), (200, 100, 50))
    out = np.array(mask_pil_image(img, torch.tensor([[True, False]])))
    assert (out[:, :32] == 0).all() and (out[:, 32:] == [200, 100, 50]).all()


@pytest.mark.parametrize(
    "family,cell", [("qwen3-vl", 14), ("qwen3-vl", 32), ("qwen2.5-vl", 14), ("qwen2.5-vl", 9)]
)
def test_pixel_cells_match_pil_masking_of_the_resized_image(tiny_vlms, family, cell):
    """The authors' masking (cell_px-pixel squares of the resized image, not aligned with patches) on
    pixel_values rows equals blacking the squares on the PIL image and running the processor."""
    from vlcal_verl.vce_mask import mask_pil_image_px, mask_pixel_values_px, pixel_cell_masks

    _, processor = tiny_vlms[family]
    ip = processor.image_processor
    factor = ip.patch_size * ip.merge_size
    imgs = [_image(3 * factor, 2 * factor, seed=4), _image(2 * factor, 2 * factor, seed=5)]  # already resized
    enc = ip(images=imgs, return_tensors="pt")
    masks = pixel_cell_masks(enc["image_grid_thw"], [2], ["s"], 0.5, 7, cell, ip.patch_size)
    assert tuple(masks[0].shape) == (-(-2 * factor // cell), -(-3 * factor // cell))
    rows = mask_pixel_values_px(
        enc["pixel_values"],
        enc["image_grid_thw"],
        masks,
        cell,
        ip.patch_size,
        ip.merge_size,
        black_row_for(processor),
    )
    via_pil = ip(
        images=[mask_pil_image_px(im, m, cell) for im, m in zip(imgs, masks, strict=True)],
        return_tensors="pt",
    )
    assert torch.allclose(rows, via_pil["pixel_values"], atol=1e-5)
    if cell == factor:  # a cell the size of a merged cell is the merged-cell masking
        merged = mask_pixel_values(
            enc["pixel_values"], enc["image_grid_thw"], masks, ip.merge_size, black_row_for(processor)
        )
        assert torch.equal(rows, merged)
