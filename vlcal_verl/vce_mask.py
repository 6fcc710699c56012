"""Seeded patch masking for VCE: black out merged-patch cells of each image with probability p.

VCE (docs/design.md §4) compares the policy's next-token distributions with the original image and with a
perturbed one. The perturbation is a grid of cells aligned with the model's *merged* patch grid
(Qwen2.5-VL: patch 14 × merge 2 = 28 px; Qwen3-VL: patch 16 × merge 2 = 32 px), so a masked cell is
exactly one LLM image token. A rollout must always get the same mask, so the cell mask is drawn from a
generator seeded by a stable hash of (seed, uid, image index) — never Python's salted ``hash()``.

Masking is done either on PIL images (before the processor) or directly on the processor's
``pixel_values`` rows, which avoids a second image-processor run. Qwen-VL processors emit, per image,
``t·h·w`` rows ordered (t, h/m, w/m, m, m) — each merged cell is a contiguous block of m² rows — and
each row is (channel, temporal patch, patch row, patch col) flattened. Black (pixel value 0) becomes the
normalised value (0 − mean_c)/std_c on every element of channel c.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def mask_seed(seed: int, uid: str | int, image_index: int) -> int:
    """Stable 64-bit seed from (seed, uid, image index) (blake2b; identical across processes and runs).

    >>> mask_seed(0, "a", 0) == mask_seed(0, "a", 0) != mask_seed(0, "b", 0)
    True
    """
    key = f"{int(seed)}\x1f{uid}\x1f{int(image_index)}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


def cell_mask(
    grid_h: int, grid_w: int, p: float, seed: int, uid: str | int, image_index: int
) -> torch.Tensor:
    """Bool mask [grid_h, grid_w] over merged cells; True = blacked out (each independently with prob p)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"mask_prob must be in [0, 1], got {p}")
    if grid_h <= 0 or grid_w <= 0:
        raise ValueError(f"merged grid must be positive, got {grid_h}×{grid_w}")
    rng = np.random.default_rng(mask_seed(seed, uid, image_index))
    return torch.from_numpy(rng.random((grid_h, grid_w)) < p)


def black_row(
    image_mean: Sequence[float], image_std: Sequence[float], temporal_patch_size: int, patch_size: int
) -> torch.Tensor:
    """The pixel_values row of an all-black patch, [C·T·P·P]: (0 − mean_c)/std_c repeated per channel."""
    mean = torch.as_tensor(image_mean, dtype=torch.float64)
    std = torch.as_tensor(image_std, dtype=torch.float64)
    if mean.shape != std.shape or mean.ndim != 1:
        raise ValueError(f"image_mean/image_std must be equal-length lists, got {mean.shape} and {std.shape}")
    per_channel = (0.0 - mean) / std
    return per_channel.repeat_interleave(temporal_patch_size * patch_size * patch_size).float()


def black_row_for(processor: Any) -> torch.Tensor:
    """:func:`black_row` from a Qwen-VL processor (or its ``image_processor``)."""
    ip = getattr(processor, "image_processor", processor)
    return black_row(ip.image_mean, ip.image_std, ip.temporal_patch_size, ip.patch_size)


def mask_pixel_values(
    pixel_values: torch.Tensor,
    image_grid_thw: torch.Tensor,
    masks: Sequence[torch.Tensor],
    merge_size: int,
    black: torch.Tensor,
) -> torch.Tensor:
    """Return a copy of ``pixel_values`` with the rows of masked cells set to ``black``.

    Args:
        pixel_values: [sum_i t_i·h_i·w_i, C·T·P·P] processor rows of all images, in image order.
        image_grid_thw: [n_images, 3] (t, h, w) in patches.
        masks: one bool tensor [h_i/m, w_i/m] per image (True = black); ``None`` leaves an image as is.
        merge_size: m, the spatial merge size (2 for Qwen2.5-VL and Qwen3-VL).
        black: [C·T·P·P] row from :func:`black_row`.
    """
    if len(masks) != image_grid_thw.shape[0]:
        raise ValueError(f"masks: need one per image ({image_grid_thw.shape[0]}), got {len(masks)}")
    if pixel_values.shape[-1] != black.shape[0]:
        raise ValueError(
            f"black row has {black.shape[0]} values but pixel_values rows have {pixel_values.shape[-1]}"
        )
    counts = image_grid_thw.prod(-1).tolist()
    if sum(counts) != pixel_values.shape[0]:
        raise ValueError(
            f"image_grid_thw covers {sum(counts)} rows but pixel_values has {pixel_values.shape[0]}"
        )
    row_mask = torch.zeros(pixel_values.shape[0], dtype=torch.bool)
    start = 0
    for (t, h, w), mask, n in zip(image_grid_thw.tolist(), masks, counts, strict=True):
        if mask is not None:
            if tuple(mask.shape) != (h // merge_size, w // merge_size):
                raise ValueError(
                    f"mask shape {tuple(mask.shape)} != merged grid {(h // merge_size, w // merge_size)}"
                )
            # rows are (t, h/m, w/m, m, m): every merged cell owns m² consecutive rows, for every t
            per_row = mask.reshape(1, -1, 1).expand(t, -1, merge_size * merge_size).reshape(-1)
            row_mask[start : start + n] = per_row
        start += n
    out = pixel_values.clone()
    out[row_mask.to(out.device)] = black.to(device=out.device, dtype=out.dtype)
    return out


def pixel_cell_masks(
    image_grid_thw: torch.Tensor,
    counts: Sequence[int],
    uids: Sequence[str | int],
    p: float,
    seed: int,
    cell_px: int,
    patch_size: int,
) -> list[torch.Tensor]:
    """One seeded mask per image over square cells of ``cell_px`` pixels of the *resized* image (the
    authors' masking: 14-px squares, whatever the model's patch grid), ⌈H/c⌉ × ⌈W/c⌉ cells; the seeds
    are those of :func:`batch_cell_masks`."""
    if cell_px <= 0:
        raise ValueError(f"cell_px must be > 0, got {cell_px}")

    def grid(h: int, w: int) -> tuple[int, int]:
        return -(-h * patch_size // cell_px), -(-w * patch_size // cell_px)

    return _seeded_masks(image_grid_thw, counts, uids, p, seed, grid)


def _seeded_masks(image_grid_thw, counts, uids, p, seed, grid) -> list[torch.Tensor]:
    """One :func:`cell_mask` per image of shape ``grid(h, w)`` (h, w in patches); the image index
    restarts at 0 within each sample (uid)."""
    if len(uids) != len(counts):
        raise ValueError(f"uids: need one per sample ({len(counts)}), got {len(uids)}")
    grids = image_grid_thw.tolist()
    masks, i = [], 0
    for uid, n in zip(uids, counts, strict=True):
        for k in range(n):
            _, h, w = grids[i]
            masks.append(cell_mask(*grid(h, w), p, seed, uid, k))
            i += 1
    return masks


def mask_pixel_values_px(
    pixel_values: torch.Tensor,
    image_grid_thw: torch.Tensor,
    masks: Sequence[torch.Tensor | None],
    cell_px: int,
    patch_size: int,
    merge_size: int,
    black: torch.Tensor,
) -> torch.Tensor:
    """Like :func:`mask_pixel_values` for cells of ``cell_px`` pixels that need not align with patches:
    every *pixel* of a masked cell becomes black, inside whichever patch rows it falls."""
    counts = image_grid_thw.prod(-1).tolist()
    if sum(counts) != pixel_values.shape[0] or len(masks) != len(counts):
        raise ValueError("mask_pixel_values_px: pixel_values, image_grid_thw and masks disagree")
    ps, m = patch_size, merge_size
    per_patch = pixel_values.shape[-1] // (ps * ps)  # channels × temporal patch
    out = pixel_values.clone()
    black_rows = black.to(device=out.device, dtype=out.dtype).reshape(per_patch, ps * ps)
    start = 0
    for (t, h, w), mask, n in zip(image_grid_thw.tolist(), masks, counts, strict=True):
        if mask is not None:
            px = mask.repeat_interleave(cell_px, 0)[: h * ps].repeat_interleave(cell_px, 1)[:, : w * ps]
            # pixel (y, x) with y = (hb·m + hm)·P + py → row (hb, wb, hm, wm), element (py, px)
            rows = px.reshape(h // m, m, ps, w // m, m, ps).permute(0, 3, 1, 4, 2, 5).reshape(h * w, ps * ps)
            rows = rows.repeat(t, 1).to(out.device)  # rows are (t, h/m, w/m, m, m)
            block = out[start : start + n].reshape(n, per_patch, ps * ps)
            keep = ~rows.unsqueeze(1)
            out[start : start + n] = torch.where(keep, block, black_rows.unsqueeze(0)).reshape(n, -1)
        start += n
    return out


def mask_pil_image_px(image: Any, mask: torch.Tensor, cell_px: int) -> Any:
    """Black out ``cell_px``-pixel squares of a PIL image (cell (i, j) → pixels i·c..(i+1)·c)."""
    from PIL import Image

    arr = np.array(image.convert("RGB"))
    for i, j in mask.nonzero().tolist():
        arr[i * cell_px : (i + 1) * cell_px, j * cell_px : (j + 1) * cell_px] = 0
    return Image.fromarray(arr)


def images_per_sample(
    input_ids: torch.Tensor, image_grid_thw: torch.Tensor, image_token_id: int, merge_size: int
) -> list[int]:
    """How many consecutive ``image_grid_thw`` rows belong to each sample (by counting image tokens).

    input_ids: [B, L]; each image i contributes t·h·w/m² image tokens, images in batch order.
    """
    tokens = (input_ids == image_token_id).sum(-1).tolist()
    per_image = (image_grid_thw.prod(-1) // (merge_size * merge_size)).tolist()
    out, i = [], 0
    for b, need in enumerate(tokens):
        n = 0
        while need > 0:
            if i >= len(per_image):
                raise ValueError(f"input_ids[{b}] has more image tokens than image_grid_thw describes")
            need -= per_image[i]
            i, n = i + 1, n + 1
        if need != 0:
            raise ValueError(f"input_ids[{b}]: image tokens do not match image_grid_thw rows")
        out.append(n)
    if i != len(per_image):
        raise ValueError(f"image_grid_thw has {len(per_image)} images but input_ids use {i}")
    return out


def batch_cell_masks(
    image_grid_thw: torch.Tensor,
    counts: Sequence[int],
    uids: Sequence[str | int],
    p: float,
    seed: int,
    merge_size: int,
) -> list[torch.Tensor]:
    """One seeded cell mask per image; image index restarts at 0 within each sample (uid)."""
    return _seeded_masks(
        image_grid_thw, counts, uids, p, seed, lambda h, w: (h // merge_size, w // merge_size)
    )


def mask_pil_image(image: Any, mask: torch.Tensor) -> Any:
    """Black out the cells of ``mask`` [gh, gw] on a PIL image, cell (i, j) → rows i·H/gh..(i+1)·H/gh.

    Give the image at the processor's resized size (a multiple of patch × merge) to make this match
    :func:`mask_pixel_values` exactly; other sizes are masked proportionally.
    """
    from PIL import Image

    arr = np.array(image.convert("RGB"))
    h, w = arr.shape[:2]
    gh, gw = mask.shape
    ys = np.round(np.arange(gh + 1) * h / gh).astype(int)
    xs = np.round(np.arange(gw + 1) * w / gw).astype(int)
    for i, j in mask.nonzero().tolist():
        arr[ys[i] : ys[i + 1], xs[j] : xs[j + 1]] = 0
    return Image.fromarray(arr)


def merged_grid_for(processor: Any, image: Any) -> tuple[int, int]:
    """(h/m, w/m): the merged-cell grid the Qwen-VL processor will use for ``image`` (after smart_resize)."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    ip = getattr(processor, "image_processor", processor)
    factor = ip.patch_size * ip.merge_size
    h, w = smart_resize(
        image.height,
        image.width,
        factor=factor,
        min_pixels=ip.size["shortest_edge"],
        max_pixels=ip.size["longest_edge"],
    )
    return h // factor, w // factor


def mask_pil_images(processor: Any, images: Sequence[Any], uid: str | int, p: float, seed: int) -> list[Any]:
    """Masked copies of one sample's images, seeded by (seed, uid, image index) like the row masking."""
    out = []
    for k, img in enumerate(images):
        gh, gw = merged_grid_for(processor, img)
        out.append(mask_pil_image(img, cell_mask(gh, gw, p, seed, uid, k)))
    return out


# ----------------------------------------------------------------------------------------------------
# InternVL: whole tiles, [n_tiles, C, S, S] (S = 448; 14-px patches, pixel shuffle 0.5 → 28-px cells)
# ----------------------------------------------------------------------------------------------------


def black_pixel(image_mean: Sequence[float], image_std: Sequence[float]) -> torch.Tensor:
    """The normalised value of a black pixel, one per channel: (0 − mean_c)/std_c, [C]."""
    return black_row(image_mean, image_std, 1, 1)


def tile_masks(n_tiles: int, cells: int, p: float, seed: int, uid: str | int) -> list[torch.Tensor]:
    """One seeded [cells, cells] mask per tile of a sample. InternVL's tiles — the crops of every image
    and, for an image of more than one crop, its thumbnail, in the processor's order — are numbered
    across the sample, and tile k is seeded like image k of :func:`cell_mask`."""
    return [cell_mask(cells, cells, p, seed, uid, k) for k in range(n_tiles)]


def mask_tiles(
    pixel_values: torch.Tensor, masks: Sequence[torch.Tensor | None], cell_px: int, black: torch.Tensor
) -> torch.Tensor:
    """Copy of InternVL ``pixel_values`` [n, C, S, S] with every pixel of a masked cell set to ``black``
    [C]; ``masks[k]`` is [⌈S/c⌉, ⌈S/c⌉] over ``cell_px`` squares of tile k (``None`` keeps it)."""
    if pixel_values.ndim != 4 or len(masks) != pixel_values.shape[0]:
        raise ValueError(
            f"mask_tiles: need pixel_values [n, C, S, S] and one mask per tile, got {tuple(pixel_values.shape)} "
            f"and {len(masks)} masks"
        )
    side = pixel_values.shape[-1]
    cells = -(-side // cell_px)
    out = pixel_values.clone()
    value = black.to(device=out.device, dtype=out.dtype).view(-1, 1, 1)
    for k, mask in enumerate(masks):
        if mask is None:
            continue
        if tuple(mask.shape) != (cells, cells):
            raise ValueError(
                f"tile mask {tuple(mask.shape)} != the {cells}×{cells} grid of {cell_px}-px cells of a {side}-px tile"
            )
        px = mask.repeat_interleave(cell_px, 0).repeat_interleave(cell_px, 1)[:side, :side].to(out.device)
        out[k] = torch.where(px.unsqueeze(0), value, out[k])
    return out


def mask_internvl_pixel_values(
    pixel_values: torch.Tensor, uid: str | int, p: float, seed: int, cell_px: int, black: torch.Tensor
) -> torch.Tensor:
    """One sample's InternVL tiles with seeded ``cell_px`` cells blacked out (:func:`tile_masks`)."""
    side = pixel_values.shape[-1]
    masks = tile_masks(pixel_values.shape[0], -(-side // cell_px), p, seed, uid)
    return mask_tiles(pixel_values, masks, cell_px, black)
