"""Tiny random vision-language models, built offline in seconds, for tests, benchmarks and the local demo.

Real Qwen-VL checkpoints are gigabytes and need the hub; the algorithm code (VCE masking, KL_t, TAR)
only needs the *architecture* — the same processor row layout, image-token expansion and M-RoPE — so
these models use the real classes with hand-written tiny configs and the real Qwen tokenizer
(:func:`vlcal_verl.testing.tokenizer.qwen_tokenizer`). They are saved once to a cache folder and
reloaded with ``AutoProcessor`` / ``AutoModelForImageTextToText`` like any checkpoint.

``tokenizer="small"`` swaps in :func:`vlcal_verl.testing.small_tokenizer.small_tokenizer`, a ~660-token
byte-level BPE trained on the demo's text (for ``internvl`` with InternVL's image tokens appended): the
model's vocabulary and its special-token ids follow that tokenizer, so the logits shrink ~230× (what a CPU
GRPO step mostly computes).

Families: ``qwen3-vl`` (default; patch 16, merge 2 → 32 px cells), ``qwen2.5-vl`` (patch 14, merge 2 →
28 px cells) and ``internvl`` (transformers' InternVL classes with a Qwen2 language model).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

FAMILIES = ("qwen3-vl", "qwen2.5-vl", "internvl")
TOKENIZERS = ("qwen", "small")
TEXT_VOCAB = 151936  # Qwen models pad the 151,669-token vocabulary to 151,936 embeddings
IMAGE_TOKEN_ID = 151655
VIDEO_TOKEN_ID = 151656
VISION_START_ID = 151652
VISION_END_ID = 151653
VISION_PAD_ID = 151654
# Small images (easy-vqa is 64×64): at most 128×128 pixels → ≤ 16 image tokens per image.
MIN_PIXELS = 32 * 32
MAX_PIXELS = 128 * 128
TINY_VERSION = "v1"  # bump when a config below changes so old caches are not reused


def cache_root() -> Path:
    """``$VLCAL_CACHE/tiny`` or ``~/.cache/vlcal_verl/tiny``."""
    base = os.environ.get("VLCAL_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "vlcal_verl") / "tiny"


def vision_special_token_ids(processor: Any = None) -> list[int]:
    """Ids a random model must never generate: image/video pads and vision start/end/pad markers
    (the Qwen ids without a processor; its tokenizer's ids with one, whichever tokenizer it is)."""
    tok = getattr(processor, "tokenizer", None)
    ids = {IMAGE_TOKEN_ID, VIDEO_TOKEN_ID, VISION_START_ID, VISION_END_ID, VISION_PAD_ID}
    if tok is not None:
        names = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>")
        found = {tok.convert_tokens_to_ids(n) for n in names}
        ids = {i for i in found if isinstance(i, int) and i >= 0 and i != tok.unk_token_id}
    for name in ("image_token_id", "start_image_token_id", "end_image_token_id", "video_token_id"):
        for obj in (processor, tok):
            v = getattr(obj, name, None)
            if isinstance(v, int):
                ids.add(v)
    return sorted(ids)


def generation_kwargs(processor: Any = None) -> dict[str, Any]:
    """``generate`` kwargs that stop a random model from emitting vision special tokens.

    >>> kw = generation_kwargs()
    >>> [IMAGE_TOKEN_ID] in kw["bad_words_ids"]
    True
    """
    tok = getattr(processor, "tokenizer", None)
    pad = getattr(tok, "pad_token_id", None)
    return {"bad_words_ids": [[i] for i in vision_special_token_ids(processor)], "pad_token_id": pad}


def _qwen3_vl_config(text: dict[str, Any], ids: dict[str, int]):
    from transformers import Qwen3VLConfig

    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=text["hidden_size"],
        num_position_embeddings=64,  # a perfect square (8×8 grid, interpolated)
        deepstack_visual_indexes=[1],
    )
    text = dict(
        text,
        head_dim=16,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 5e6,
            "mrope_section": [4, 2, 2],
            "mrope_interleaved": True,
        },
    )
    return Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        **{k: ids[k] for k in _VISION_ID_KEYS},
        tie_word_embeddings=False,
    )


def _qwen2_5_vl_config(text: dict[str, Any], ids: dict[str, int]):
    from transformers import Qwen2_5_VLConfig

    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=56,
        fullatt_block_indexes=[1],
        out_hidden_size=text["hidden_size"],
    )
    text = dict(text, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]})
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        **{k: ids[k] for k in _VISION_ID_KEYS},
        tie_word_embeddings=False,
    )


_VISION_ID_KEYS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
QWEN_IDS = {
    "image_token_id": IMAGE_TOKEN_ID,
    "video_token_id": VIDEO_TOKEN_ID,
    "vision_start_token_id": VISION_START_ID,
    "vision_end_token_id": VISION_END_ID,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "pad_token_id": 151643,
}


def _text_config(vocab_size: int = TEXT_VOCAB, ids: dict[str, int] = QWEN_IDS) -> dict[str, Any]:
    # head_dim = 64 / 4 = 16 → M-RoPE sections sum to 8
    return dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=ids["bos_token_id"],
        eos_token_id=ids["eos_token_id"],
        pad_token_id=ids["pad_token_id"],
    )


def _qwen_processor(family: str, tok: Any):
    from transformers import Qwen2VLImageProcessor

    from vlcal_verl.testing.tokenizer import CHAT_TEMPLATE

    patch = 16 if family == "qwen3-vl" else 14
    mean_std = ([0.5] * 3, [0.5] * 3) if family == "qwen3-vl" else (None, None)
    ip_kwargs: dict[str, Any] = dict(
        patch_size=patch, merge_size=2, temporal_patch_size=2, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS
    )
    if mean_std[0] is not None:
        ip_kwargs.update(image_mean=mean_std[0], image_std=mean_std[1])
    image_processor = Qwen2VLImageProcessor(**ip_kwargs)
    if family == "qwen3-vl":
        from transformers import Qwen3VLProcessor, Qwen3VLVideoProcessor

        video = Qwen3VLVideoProcessor(patch_size=patch, merge_size=2, temporal_patch_size=2)
        return Qwen3VLProcessor(
            image_processor=image_processor, tokenizer=tok, video_processor=video, chat_template=CHAT_TEMPLATE
        )
    from transformers import Qwen2_5_VLProcessor, Qwen2VLVideoProcessor

    video = Qwen2VLVideoProcessor(patch_size=patch, merge_size=2, temporal_patch_size=2)
    return Qwen2_5_VLProcessor(
        image_processor=image_processor, tokenizer=tok, video_processor=video, chat_template=CHAT_TEMPLATE
    )


def check_family_tokenizer(family: str, tokenizer: str) -> None:
    """ValueError naming the problem for an unknown family or tokenizer (every family takes both)."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {tokenizer!r}")


def _qwen_family_config(family: str, tokenizer: str):
    """(model config, processor) of a Qwen-VL family with the Qwen or the small tokenizer."""
    if tokenizer == "small":
        from vlcal_verl.testing.small_tokenizer import small_tokenizer, special_token_ids

        tok = small_tokenizer()
        ids, vocab = special_token_ids(tok), len(tok)
    else:
        from vlcal_verl.testing.tokenizer import qwen_tokenizer

        tok, ids, vocab = qwen_tokenizer(), QWEN_IDS, TEXT_VOCAB
    make = _qwen3_vl_config if family == "qwen3-vl" else _qwen2_5_vl_config
    return make(_text_config(vocab, ids), ids), _qwen_processor(family, tok)


def _internvl_config(tokenizer: str):
    """(InternVLConfig, InternVLProcessor) with the Qwen tokenizer (Qwen's padded vocabulary and ids) or the
    small BPE (vocabulary ``len(tok)``, bos/eos/pad read from it), InternVL's image tokens added to either."""
    from vlcal_verl.testing.tiny_internvl import internvl_config_and_processor, internvl_tokenizer

    if tokenizer != "small":
        return internvl_config_and_processor(_text_config())
    from vlcal_verl.testing.small_tokenizer import special_token_ids

    tok = internvl_tokenizer("small")
    return internvl_config_and_processor(_text_config(len(tok), special_token_ids(tok)), tok)


def build_tiny_vlm(
    family: str = "qwen3-vl",
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    overwrite: bool = False,
    tokenizer: str = "qwen",
) -> Path:
    """Build (or reuse) a tiny random VLM and its processor; return the saved folder.

    The folder is ``<cache_dir or cache_root()>/<family>-<TINY_VERSION>[-small]-seed<seed>`` (``-small``
    with ``tokenizer="small"``) and reloads with ``AutoProcessor.from_pretrained`` /
    ``AutoModelForImageTextToText.from_pretrained``.
    """
    check_family_tokenizer(family, tokenizer)
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    tag = "-small" if tokenizer == "small" else ""
    out = root / f"{family}-{TINY_VERSION}{tag}-seed{seed}"
    if (out / "config.json").exists() and (out / "processor_config.json").exists() and not overwrite:
        return out
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForImageTextToText

    if family == "internvl":
        config, processor = _internvl_config(tokenizer)
    else:
        config, processor = _qwen_family_config(family, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    if out.exists():  # overwrite=True, or a half-written folder from a crashed run
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)  # atomic: concurrent builders never see a half-written folder
    return out


def load_tiny_vlm(
    family: str = "qwen3-vl",
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    dtype: Any = None,
    tokenizer: str = "qwen",
):
    """Return ``(model, processor)`` for a tiny random VLM (built on first use, then cached on disk).

    >>> model, processor = load_tiny_vlm("qwen3-vl")   # doctest: +SKIP
    >>> model.config.image_token_id
    151655
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = build_tiny_vlm(family, cache_dir=cache_dir, seed=seed, tokenizer=tokenizer)
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype or torch.float32)
    model.eval()
    return model, processor
