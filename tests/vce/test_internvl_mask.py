"""InternVL tile masking: seeded per-tile masks, pixel-exact cells on [n, C, S, S] tiles, agreement with
PIL masking of each crop and of the thumbnail, the VCE engine's InternVL branch and the worker's constants.

The tiny InternVL has 28-px tiles, 7-px patches and pixel shuffle 0.5, so one LLM image token covers a
14-px cell: 2×2 cells per tile.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from vlcal_verl.config import VCEConfig
from vlcal_verl.vce_mask import (
    batch_cell_masks,
    black_pixel,
    black_row,
    cell_mask,
    mask_internvl_pixel_values,
    mask_pil_image,
    mask_pixel_values,
    mask_tiles,
    tile_masks,
)

TILE, CELL = 28, 14  # tiny InternVL: tile side, merged cell (patch 7 × 2)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # GotOcr2ImageProcessor's defaults (OpenAI CLIP)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _image(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def folders(tiny_cache):
    from vlcal_verl.testing.tiny_models import build_tiny_vlm

    root = os.path.join(tiny_cache, "tiny")
    return {fam: build_tiny_vlm(fam, cache_dir=root) for fam in ("internvl", "qwen3-vl")}


@pytest.fixture(scope="module")
def internvl(folders):
    from transformers import AutoConfig, AutoProcessor

    path = folders["internvl"]
    return AutoProcessor.from_pretrained(path), AutoConfig.from_pretrained(path)


def _brute_force(pv, masks, cell, black):
    """Per-pixel loop: pixel (y, x) of tile k is black iff masks[k][y // cell, x // cell]."""
    out = pv.clone()
    n, _, h, w = pv.shape
    for k in range(n):
        if masks[k] is None:
            continue
        for y in range(h):
            for x in range(w):
                if masks[k][y // cell, x // cell]:
                    out[k, :, y, x] = black
    return out


# ---------------------------------------------------------------------------------------------- tile_masks


def test_tile_masks_are_cell_masks_seeded_by_tile_index():
    """Tile k's mask is cell_mask(cells, cells, p, seed, uid, k); same call → same masks; uid changes them."""
    masks = tile_masks(5, 4, 0.5, seed=3, uid="u")
    assert len(masks) == 5
    for k, m in enumerate(masks):
        assert m.shape == (4, 4) and m.dtype == torch.bool
        assert torch.equal(m, cell_mask(4, 4, 0.5, 3, "u", k))
    assert all(torch.equal(a, b) for a, b in zip(masks, tile_masks(5, 4, 0.5, 3, "u"), strict=True))
    other = tile_masks(5, 4, 0.5, 3, "v")
    assert any(not torch.equal(a, b) for a, b in zip(masks, other, strict=True))
    assert not torch.equal(torch.stack(masks), torch.stack(tile_masks(5, 4, 0.5, 4, "u")))  # seed matters


def test_tile_masks_probability_edges():
    """p=0 masks no cell, p=1 masks every cell of every tile; p outside [0, 1] is refused."""
    assert not torch.stack(tile_masks(3, 3, 0.0, 0, "x")).any()
    assert torch.stack(tile_masks(3, 3, 1.0, 0, "x")).all()
    with pytest.raises(ValueError, match="mask_prob"):
        tile_masks(1, 2, -0.1, 0, "x")


# ---------------------------------------------------------------------------------------------- mask_tiles


def test_black_pixel_hand_values():
    """black_pixel = (0 − mean_c)/std_c per channel: hand values and CLIP's constants."""
    assert torch.allclose(black_pixel([0.5, 0.25, 0.0], [0.5, 0.25, 1.0]), torch.tensor([-1.0, -1.0, 0.0]))
    clip = black_pixel(CLIP_MEAN, CLIP_STD)
    assert clip.shape == (3,)
    assert torch.allclose(clip, torch.tensor([-1.7922625, -1.7520971, -1.4802198]), atol=1e-6)


@pytest.mark.parametrize("cell,cells", [(7, 4), (10, 3), (14, 2), (28, 1)])
def test_mask_tiles_matches_per_pixel_loop(cell, cells):
    """mask_tiles equals a per-pixel brute force, including cells that overhang the tile (⌈28/10⌉ = 3,
    last cell cropped to 8 px); a None mask keeps its tile; the input is not modified."""
    g = torch.Generator().manual_seed(cell)
    pv = torch.randn(3, 3, TILE, TILE, generator=g)
    before = pv.clone()
    black = torch.tensor([-2.0, -3.0, -4.0])
    masks = [cell_mask(cells, cells, 0.5, 1, "s", k) for k in range(3)]
    masks[1] = None
    out = mask_tiles(pv, masks, cell, black)
    assert torch.equal(out, _brute_force(pv, masks, cell, black))
    assert torch.equal(out[1], pv[1]) and torch.equal(pv, before)
    for k in (0, 2):  # masked pixels are exactly the masked cells' area, clipped to the tile
        sides = [min(cell, TILE - i * cell) for i in range(cells)]
        area = sum(sides[i] * sides[j] for i, j in masks[k].nonzero().tolist())
        assert int((out[k] != pv[k]).any(0).sum()) == area


def test_mask_tiles_black_is_normalised_zero_per_channel():
    """A fully masked tile holds (0 − mean_c)/std_c on every pixel of channel c."""
    mean, std = [0.5, 0.25, 0.1], [0.5, 0.5, 0.2]
    pv = torch.randn(2, 3, TILE, TILE)
    out = mask_tiles(pv, [torch.ones(2, 2, dtype=torch.bool), None], CELL, black_pixel(mean, std))
    for c, (m, s) in enumerate(zip(mean, std, strict=True)):
        assert torch.allclose(out[0, c], torch.full((TILE, TILE), (0 - m) / s))
    assert torch.equal(out[1], pv[1])


def test_mask_tiles_black_equals_processor_on_black_image(internvl):
    """black_pixel of the processor's mean/std is what the processor itself makes of an all-black tile."""
    processor, _ = internvl
    ip = processor.image_processor
    pv = ip(images=[Image.new("RGB", (TILE, TILE))], return_tensors="pt")["pixel_values"]
    black = black_pixel(ip.image_mean, ip.image_std)
    assert pv.shape == (1, 3, TILE, TILE)
    assert torch.allclose(pv[0], black.view(3, 1, 1).expand(3, TILE, TILE), atol=1e-6)


def test_mask_tiles_shape_errors():
    """Wrong pixel_values rank, wrong number of masks, or masks that do not cover the tile raise."""
    pv, black = torch.zeros(2, 3, TILE, TILE), torch.zeros(3)
    m = torch.ones(2, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="one mask per tile"):
        mask_tiles(pv[0], [m, m, m], CELL, black)  # [C, S, S]
    with pytest.raises(ValueError, match="one mask per tile"):
        mask_tiles(pv, [m], CELL, black)
    with pytest.raises(ValueError, match="3×3 grid"):
        mask_tiles(pv, [m, m], 10, black)  # 2 × 10 px < 28
    with pytest.raises(ValueError, match="3×3 grid"):
        mask_tiles(pv, [torch.ones(4, 4, dtype=torch.bool), None], 10, black)  # a 4th cell starts at 30 px
    with pytest.raises(ValueError, match="2×2 grid"):  # not square: extra columns would be ignored
        mask_tiles(pv, [torch.ones(2, 5, dtype=torch.bool), None], CELL, black)


def test_mask_internvl_pixel_values_uses_ceil_grid_and_tile_seeds():
    """mask_internvl_pixel_values = mask_tiles with tile_masks over ⌈S/c⌉ cells (c = 14 → 2, c = 10 → 3)."""
    pv, black = torch.randn(4, 3, TILE, TILE), torch.tensor([-1.0, -2.0, -3.0])
    for cell, cells in ((CELL, 2), (10, 3)):
        want = _brute_force(pv, [cell_mask(cells, cells, 0.6, 5, "q", k) for k in range(4)], cell, black)
        assert torch.equal(mask_internvl_pixel_values(pv, "q", 0.6, 5, cell, black), want)


# ---------------------------------------------------------------------------------- agreement with PIL masking


def _denormalise(tile, ip):
    """The uint8 PIL image a processed tile came from: x·std + mean, ×255 (the resize works on uint8)."""
    mean = torch.tensor(ip.image_mean).view(3, 1, 1)
    std = torch.tensor(ip.image_std).view(3, 1, 1)
    u = (tile * std + mean) * 255
    assert (u - u.round()).abs().max() < 1e-3  # the tile is an exact uint8 image
    return Image.fromarray(u.round().clamp(0, 255).byte().permute(1, 2, 0).numpy())


def test_tile_masking_equals_pil_masking_of_crops_and_thumbnails(internvl):
    """One sample with a 56×56 image (2×2 crops + thumbnail) and a 56×28 one (1×2 crops + thumbnail):
    8 tiles numbered across the sample. Masking the processor's tiles equals blacking the same 14-px cells
    on each tile as a PIL image and processing it alone. The crops are the exact sub-images of a
    canvas-sized image (row-major, GotOcr2ImageProcessor.crop_image_to_patches); the thumbnail (the
    whole image resized to 28×28) is recovered by denormalising its row, checked to reprocess bit-equal."""
    processor, _ = internvl
    ip = processor.image_processor
    images = [_image(56, 56, seed=1), _image(56, 28, seed=2)]
    enc = ip(images=images, return_tensors="pt")
    pv = enc["pixel_values"]
    assert pv.shape == (8, 3, TILE, TILE) and enc["num_patches"].tolist() == [5, 3]

    tiles = []
    for img, (cols, rows) in zip(images, [(2, 2), (2, 1)], strict=True):
        for i in range(cols * rows):  # crop i: column i % cols, row i // cols
            c, r = i % cols, i // cols
            tiles.append(img.crop((c * TILE, r * TILE, (c + 1) * TILE, (r + 1) * TILE)))
        # the thumbnail: the processor's own resize of the whole image (crop_to_patches=False)
        alone = ip(images=[img], crop_to_patches=False, return_tensors="pt")["pixel_values"]
        tiles.append(_denormalise(alone[0], ip))
    plain = ip(images=tiles, crop_to_patches=False, return_tensors="pt")["pixel_values"]
    assert torch.equal(plain, pv)  # every tile, processed alone, is bit-equal to the multi-tile call's row

    uid, p, seed = "sample-7", 0.5, 11
    masks = tile_masks(8, 2, p, seed, uid)
    assert masks[4].any() and not masks[4].all() and masks[7].any()  # both thumbnails partly masked
    via_pil = ip(
        images=[mask_pil_image(t, m) for t, m in zip(tiles, masks, strict=True)],
        crop_to_patches=False,
        return_tensors="pt",
    )["pixel_values"]
    black = black_pixel(ip.image_mean, ip.image_std)
    rows = mask_internvl_pixel_values(pv, uid, p, seed, CELL, black)
    assert torch.allclose(rows, via_pil, atol=1e-6)
    changed = (rows != pv).any(1)  # [n, S, S]
    assert int(changed.sum()) == sum(int(m.sum()) for m in masks) * CELL * CELL > 0


# ------------------------------------------------------------------------------------ vce_engine InternVL branch


def test_mask_multi_modal_inputs_internvl_branch():
    """4-D pixel_values are masked per sample with cell = merge·patch (14) or cfg.mask_cell_px, seeded by
    the sample's mask id; other keys and image-less samples pass through; no patch size → ValueError."""
    from vlcal_verl.verl_ext.vce_engine import mask_multi_modal_inputs

    black = torch.tensor([-1.5, -2.5, -3.5])
    g = torch.Generator().manual_seed(0)
    mm = [
        {"pixel_values": torch.randn(5, 3, TILE, TILE, generator=g), "extra": "kept"},
        None,
        {"pixel_values": torch.randn(1, 3, TILE, TILE, generator=g)},
    ]
    ids = ["a", "b", "c"]
    cfg = VCEConfig(mask_prob=0.5, seed=9)
    out = mask_multi_modal_inputs(mm, ids, cfg, black, merge_size=2, patch_size=7)
    assert out[1] is None and out[0]["extra"] == "kept"
    for b in (0, 2):
        pv = mm[b]["pixel_values"]
        want = mask_internvl_pixel_values(pv, ids[b], 0.5, 9, CELL, black)
        assert torch.equal(out[b]["pixel_values"], want)
        hand = _brute_force(pv, [cell_mask(2, 2, 0.5, 9, ids[b], k) for k in range(pv.shape[0])], CELL, black)
        assert torch.equal(out[b]["pixel_values"], hand)
    assert not torch.equal(out[0]["pixel_values"], mm[0]["pixel_values"])

    px = mask_multi_modal_inputs(mm, ids, VCEConfig(mask_prob=0.5, seed=9, mask_cell_px=10), black, 2, 7)
    masks10 = [cell_mask(3, 3, 0.5, 9, "a", k) for k in range(5)]  # ⌈28/10⌉ = 3 cells per side
    assert torch.equal(px[0]["pixel_values"], _brute_force(mm[0]["pixel_values"], masks10, 10, black))

    with pytest.raises(ValueError, match="patch size"):
        mask_multi_modal_inputs(mm, ids, cfg, black, merge_size=2, patch_size=None)


def test_mask_multi_modal_inputs_qwen_rows_unchanged():
    """A Qwen-style sample (2-D rows + image_grid_thw) still goes through the merged-cell row masking."""
    from vlcal_verl.verl_ext.vce_engine import mask_multi_modal_inputs

    grid = torch.tensor([[1, 4, 4], [1, 2, 2]])
    pv = torch.randn(20, 12)
    black = torch.full((12,), -9.0)
    cfg = VCEConfig(mask_prob=0.5, seed=2)
    (out,) = mask_multi_modal_inputs([{"pixel_values": pv, "image_grid_thw": grid}], ["u"], cfg, black, 2)
    masks = batch_cell_masks(grid, [2], ["u"], 0.5, 2, 2)
    assert torch.equal(out["pixel_values"], mask_pixel_values(pv, grid, masks, 2, black))
    assert torch.equal(out["image_grid_thw"], grid)


# -------------------------------------------------------------------------------------------- worker constants


def test_worker_constants_for_internvl(internvl):
    """InternVL: black = black_pixel(processor mean/std) ([C], CLIP's values), merge 1/0.5 = 2, patch 7
    (the config's [7, 7]); patch size is needed even without mask_cell_px."""
    from vlcal_verl.verl_ext.worker import image_constants, needs_patch_size, patch_size_of

    processor, hf_config = internvl
    model_config = SimpleNamespace(processor=processor, hf_config=hf_config)
    black, merge = image_constants(model_config)
    assert torch.allclose(black, black_pixel(CLIP_MEAN, CLIP_STD)) and merge == 2
    assert list(hf_config.vision_config.patch_size) == [7, 7] and patch_size_of(model_config) == 7
    assert needs_patch_size(model_config, VCEConfig()) and needs_patch_size(
        model_config, VCEConfig(mask_cell_px=9)
    )


def test_worker_constants_for_qwen3_vl_unchanged(folders):
    """Qwen3-VL: black row of length 3·2·16·16 (all −1 for mean = std = 0.5), spatial_merge_size 2, patch
    16; the patch size is needed only for pixel-square masks (mask_cell_px > 0)."""
    from transformers import AutoConfig, AutoProcessor

    from vlcal_verl.verl_ext.worker import image_constants, needs_patch_size, patch_size_of

    path = folders["qwen3-vl"]
    model_config = SimpleNamespace(
        processor=AutoProcessor.from_pretrained(path), hf_config=AutoConfig.from_pretrained(path)
    )
    black, merge = image_constants(model_config)
    assert black.shape == (3 * 2 * 16 * 16,) and torch.equal(black, torch.full((1536,), -1.0))
    assert torch.equal(black, black_row([0.5] * 3, [0.5] * 3, 2, 16)) and merge == 2
    assert patch_size_of(model_config) == 16
    assert not needs_patch_size(model_config, VCEConfig()) and needs_patch_size(
        model_config, VCEConfig(mask_cell_px=14)
    )
    with pytest.raises(ValueError, match="vision-language"):
        image_constants(SimpleNamespace(processor=None, hf_config=model_config.hf_config))
