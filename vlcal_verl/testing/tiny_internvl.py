"""Tiny random InternVL (transformers' own InternVL classes, Qwen2 language model) with the Qwen tokenizer
or the small BPE.

InternVL3.5 is one of the paper's models. transformers' ``InternVLProcessor`` expects a tokenizer that
names its image tokens (``<img>``, ``</img>``, ``<IMG_CONTEXT>``, ``<video>``); the real InternVL
tokenizer appends them after Qwen's added tokens, so here they are added to a copy of
:func:`~vlcal_verl.testing.tokenizer.qwen_tokenizer` at the next free ids (151669…151672, inside the
151,936-row embedding) — or, with ``base="small"``, to a copy of
:func:`~vlcal_verl.testing.small_tokenizer.small_tokenizer` right after its Qwen added tokens (the model's
vocabulary is then ``len(tokenizer)``). Images are 448-px tiles (patch 14, pixel-shuffle 0.5 → 256 tokens per tile in
the real model); the tiny model uses 28-px tiles of 4 tokens so a 64×64 image stays cheap.

InternVL's pixel_values are whole tiles [n_tiles, 3, H, W] (crops, then a thumbnail when an image has
more than one crop); VCE masks cells of each tile's merged grid (:func:`vlcal_verl.vce_mask.mask_tiles`).
"""

from __future__ import annotations

import copy
from typing import Any

INTERNVL_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
TILE = 28  # tile side in pixels (the real model: 448)
PATCH = 7  # 4×4 patches per tile; pixel shuffle 0.5 → 2×2 = 4 image tokens per tile

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' or 'image' in item %}<IMG_CONTEXT>\n"
    "{% elif item['type'] == 'video' or 'video' in item %}<video>\n"
    "{% elif 'text' in item %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def internvl_tokenizer(base: str = "qwen"):
    """A copy of the Qwen tokenizer (``base="qwen"``) or of the small BPE (``base="small"``) with
    InternVL's named image tokens appended and InternVL's chat template."""
    from tokenizers import AddedToken

    if base == "qwen":
        from vlcal_verl.testing.tokenizer import qwen_tokenizer as make
    elif base == "small":
        from vlcal_verl.testing.small_tokenizer import small_tokenizer as make
    else:
        raise ValueError(f"base must be 'qwen' or 'small', got {base!r}")
    tok = copy.deepcopy(make())
    tok.add_tokens(
        [AddedToken(t, special=True, normalized=False) for t in INTERNVL_TOKENS.values()], special_tokens=True
    )
    # named special tokens (saved in tokenizer_config.json, restored as attributes + *_id on reload)
    tok._set_model_specific_special_tokens(special_tokens=dict(INTERNVL_TOKENS))
    tok.chat_template = CHAT_TEMPLATE
    return tok


def internvl_config_and_processor(text: dict[str, Any], tok: Any = None):
    """(InternVLConfig, InternVLProcessor) for the tiny model; ``text`` is the shared tiny text config
    (its vocabulary and bos/eos/pad ids must be ``tok``'s), ``tok`` an :func:`internvl_tokenizer` (default:
    the Qwen-based one)."""
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLProcessor,
        InternVLVideoProcessor,
    )

    tok = tok if tok is not None else internvl_tokenizer()
    if max(tok.context_image_token_id, tok.video_token_id) >= text["vocab_size"]:
        raise ValueError(f"InternVL's image tokens lie outside the model's {text['vocab_size']} embeddings")
    image_seq = (TILE // PATCH) ** 2 // 4
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=[TILE, TILE],
        patch_size=[PATCH, PATCH],
        use_mean_pooling=True,
    )
    text = dict(text, model_type="qwen2", rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    config = InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tok.context_image_token_id,
        image_seq_length=image_seq,
        downsample_ratio=0.5,
        tie_word_embeddings=False,
    )
    ip = GotOcr2ImageProcessor(
        size={"height": TILE, "width": TILE}, crop_to_patches=True, min_patches=1, max_patches=4
    )
    video = InternVLVideoProcessor(size={"height": TILE, "width": TILE})
    processor = InternVLProcessor(
        image_processor=ip,
        tokenizer=tok,
        video_processor=video,
        image_seq_length=image_seq,
        chat_template=CHAT_TEMPLATE,
    )
    return config, processor
