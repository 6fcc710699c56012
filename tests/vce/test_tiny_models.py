"""The tiny VLMs reload from disk, expand image tokens like the real processors and generate no vision tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vlcal_verl.testing.tiny_models import (
    IMAGE_TOKEN_ID,
    build_tiny_vlm,
    generation_kwargs,
    vision_special_token_ids,
)


def _image(seed=0, size=64):
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8"))


@pytest.mark.parametrize("family,patch", [("qwen3-vl", 16), ("qwen2.5-vl", 14)])
def test_processor_layout_and_generate(tiny_vlms, family, patch):
    model, processor = tiny_vlms[family]
    assert processor.image_processor.patch_size == patch
    assert processor.tokenizer.convert_tokens_to_ids("<|image_pad|>") == IMAGE_TOKEN_ID
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape?"}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    enc = processor(text=[text], images=[_image()], return_tensors="pt")
    t, h, w = enc["image_grid_thw"][0].tolist()
    assert (t, h, w) == (1, 4, 4)  # 64×64 → 4×4 patches (Qwen2.5-VL resizes to 56×56)
    assert enc["pixel_values"].shape == (16, 3 * 2 * patch * patch)
    assert int((enc["input_ids"] == IMAGE_TOKEN_ID).sum()) == h * w // 4
    torch.manual_seed(0)
    out = model.generate(**enc, max_new_tokens=12, do_sample=True, **generation_kwargs(processor))
    new = out[0, enc["input_ids"].shape[1] :].tolist()
    assert len(new) > 0 and not set(new) & set(vision_special_token_ids(processor))


def test_build_is_cached_and_unknown_family_errors(tmp_path):
    with pytest.raises(ValueError, match="family"):
        build_tiny_vlm("llava", cache_dir=tmp_path)


def test_tiny_internvl_builds_reloads_and_generates(tiny_cache):
    from vlcal_verl.testing.tiny_models import load_tiny_vlm

    model, processor = load_tiny_vlm("internvl", cache_dir=f"{tiny_cache}/tiny")
    tok = processor.tokenizer
    assert type(model).__name__ == "InternVLForConditionalGeneration"
    assert (
        tok.convert_tokens_to_ids("<IMG_CONTEXT>") == processor.image_token_id == model.config.image_token_id
    )
    assert tok.convert_tokens_to_ids("<think>") == 151667  # Qwen ids unchanged
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape?"}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    enc = processor(text=[text], images=[_image()], return_tensors="pt")
    n_tiles = enc["pixel_values"].shape[0]
    assert int((enc["input_ids"] == processor.image_token_id).sum()) == 4 * n_tiles
    torch.manual_seed(0)
    out = model.generate(**enc, max_new_tokens=8, do_sample=True, **generation_kwargs(processor))
    new = out[0, enc["input_ids"].shape[1] :].tolist()
    assert new and not set(new) & set(vision_special_token_ids(processor))
