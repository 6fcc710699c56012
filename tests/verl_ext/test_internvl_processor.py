"""InternVL through verl's model config: VLCalModelConfig builds VerlInternVLProcessor (verl's hf_processor
returns None for it), image-token expansion per tile, verl's placeholder-stripped re-run, tile/token layout
checks against the model, and the guard that stops a VLM verl built no processor for.

The tiny InternVL has 28-px tiles of 4 tokens, up to 4 crops, plus a thumbnail when there is more than one.
"""

from __future__ import annotations

import copy
import os
import shutil
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape is it?"}]}]


def _image(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from vlcal_verl.testing.tiny_models import build_tiny_vlm

    cache = os.environ.get("VLCAL_CACHE")
    root = os.path.join(cache, "tiny") if cache else str(tmp_path_factory.mktemp("tiny"))
    return {fam: build_tiny_vlm(fam, cache_dir=root) for fam in ("internvl", "qwen3-vl")}


@pytest.fixture(scope="module")
def internvl_config(folders):
    from vlcal_verl.verl_ext.model_config import VLCalModelConfig

    return VLCalModelConfig(path=str(folders["internvl"]))


def _plain_processor(processor):
    """transformers' own InternVLProcessor with the same components."""
    from transformers import InternVLProcessor

    return InternVLProcessor(
        image_processor=processor.image_processor,
        tokenizer=processor.tokenizer,
        video_processor=processor.video_processor,
        image_seq_length=processor.image_seq_length,
        chat_template=processor.chat_template,
    )


# ------------------------------------------------------------------------------------------ processor choice


def test_internvl_gets_verl_internvl_processor_where_verl_gets_none(folders, internvl_config):
    """VLCalModelConfig loads VerlInternVLProcessor (no M-RoPE get_rope_index bound, the model's config
    attached); verl's own hf_processor returns None for the same folder — why the class exists."""
    from transformers import InternVLProcessor
    from verl.utils import hf_processor

    from vlcal_verl.verl_ext.model_config import VerlInternVLProcessor

    proc = internvl_config.processor
    assert type(proc) is VerlInternVLProcessor and isinstance(proc, InternVLProcessor)
    assert not hasattr(proc, "get_rope_index")
    assert proc.config is internvl_config.hf_config
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert hf_processor(str(folders["internvl"])) is None


def test_qwen3_vl_keeps_verl_processor_and_text_only_guard(folders, tmp_path):
    """Tiny Qwen3-VL still gets verl's Qwen3VLProcessor (with get_rope_index). Without its processor config
    (the folder has only processor_config.json; AutoProcessor then raises OSError "Can't load image
    processor", which verl turns into a warning), verl's HFModelConfig silently yields processor None,
    while VLCalModelConfig refuses the VLM with a ValueError naming the text-only run."""
    from transformers import Qwen3VLProcessor
    from verl.workers.config import HFModelConfig

    from vlcal_verl.verl_ext.model_config import VLCalModelConfig

    mc = VLCalModelConfig(path=str(folders["qwen3-vl"]))
    assert type(mc.processor) is Qwen3VLProcessor and hasattr(mc.processor, "get_rope_index")

    copy_dir = tmp_path / "qwen3-vl-no-processor"
    shutil.copytree(folders["qwen3-vl"], copy_dir)
    removed = [
        f
        for f in ("processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json")
        if (copy_dir / f).exists()
    ]
    assert removed == ["processor_config.json"]
    for f in removed:
        (copy_dir / f).unlink()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plain = HFModelConfig(path=str(copy_dir))
    assert plain.processor is None and plain.hf_config.vision_config is not None
    assert any("Failed to create processor" in str(w.message) for w in caught)
    with pytest.raises(ValueError, match="text-only") as err:
        VLCalModelConfig(path=str(copy_dir))
    assert "Qwen3VLConfig" in str(err.value)


# ------------------------------------------------------------------------------------ expansion and re-run


@pytest.mark.parametrize("size,n_tiles", [((28, 28), 1), ((56, 28), 3), ((56, 56), 5), ((40, 30), 1)])
def test_image_expands_to_tokens_per_tile_times_tiles(internvl_config, size, n_tiles):
    """<img> + 4·n_tiles <IMG_CONTEXT> + </img>: 28×28 → 1 tile, no thumbnail; 56×28 → 2 crops + thumbnail;
    56×56 → 2×2 crops + thumbnail; 40×30 (aspect 1.33, closest grid 1×1) → 1 tile."""
    proc = internvl_config.processor
    tok = proc.tokenizer
    text = proc.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    enc = proc(text=[text], images=[_image(*size)], return_tensors="pt")
    assert enc["pixel_values"].shape == (n_tiles, 3, 28, 28)
    ids = enc["input_ids"][0].tolist()
    start, end, ctx = (tok.convert_tokens_to_ids(t) for t in ("<img>", "</img>", "<IMG_CONTEXT>"))
    assert ctx == internvl_config.hf_config.image_token_id
    assert ids.count(start) == 1 and ids.count(end) == 1
    i = ids.index(start)
    assert ids[i + 1 : i + 1 + 4 * n_tiles] == [ctx] * (4 * n_tiles) and ids[i + 1 + 4 * n_tiles] == end
    assert ids.count(ctx) == 4 * n_tiles


def _verl_rerun_text(processor, input_ids):
    """The text verl's AgentLoopWorker._compute_multi_modal_inputs re-processes: image-token runs
    collapsed to one token, then decoded with special tokens skipped."""
    collapsed, prev = [], None
    for t in input_ids:
        if t == processor.image_token_id and t == prev:
            continue
        collapsed.append(t)
        prev = t
    return processor.tokenizer.decode(collapsed, skip_special_tokens=True)


def test_agent_loop_rerun_gives_the_same_pixel_values(internvl_config):
    """verl's re-run on the placeholder-stripped prompt returns pixel_values identical to the first call
    (and the text's ids unexpanded); transformers' own InternVLProcessor raises ValueError on it."""
    from verl.utils.tokenizer import build_multimodal_processor_inputs

    proc = internvl_config.processor
    images = [_image(56, 28, seed=3)]
    text = proc.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    first = proc(text=[text], images=images, return_tensors="pt")
    stripped = _verl_rerun_text(proc, first["input_ids"][0].tolist())
    assert "<img>" not in stripped and "<IMG_CONTEXT>" not in stripped and "What shape is it?" in stripped

    again = build_multimodal_processor_inputs(proc, text=[stripped], images=images, videos=None)
    assert torch.equal(again["pixel_values"], first["pixel_values"])
    assert again["input_ids"][0].tolist() == proc.tokenizer(stripped)["input_ids"]
    with pytest.raises(ValueError, match="placeholder"):
        build_multimodal_processor_inputs(_plain_processor(proc), text=[stripped], images=images, videos=None)


def test_calls_with_placeholders_are_transformers_own(internvl_config):
    """A call whose text holds the image placeholder, or one without images, is InternVLProcessor's own."""
    proc = internvl_config.processor
    plain = _plain_processor(proc)
    images = [_image(56, 56, seed=4), _image(28, 28, seed=5)]
    msgs = [
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "?"}]}
    ]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    ours, theirs = (p(text=[text], images=images, return_tensors="pt") for p in (proc, plain))
    assert set(ours.keys()) == set(theirs.keys())
    for k in theirs:
        assert torch.equal(ours[k], theirs[k]), k
    assert ours["pixel_values"].shape[0] == 5 + 1
    assert proc(text=["no image"])["input_ids"] == plain(text=["no image"])["input_ids"]


# ---------------------------------------------------------------------------------------- layout checks


def test_tokens_per_tile_hand_values(internvl_config):
    """(image_size / patch)² · downsample²: tiny (28, 7, 0.5) → 4; InternVL3.5 (448, 14, 0.5) → 256, as
    [h, w] lists or ints; non-square tiles are refused."""
    from transformers import InternVLConfig

    from vlcal_verl.verl_ext.model_config import tokens_per_tile

    assert tokens_per_tile(internvl_config.hf_config) == 4
    big = InternVLConfig(
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=[448, 448],
            patch_size=[14, 14],
        ),
        text_config=dict(
            model_type="qwen2",
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        ),
        downsample_ratio=0.5,
    )
    assert tokens_per_tile(big) == 256
    ints = SimpleNamespace(vision_config=SimpleNamespace(image_size=448, patch_size=14), downsample_ratio=0.5)
    assert tokens_per_tile(ints) == 256
    oblong = SimpleNamespace(
        vision_config=SimpleNamespace(image_size=[448, 224], patch_size=14), downsample_ratio=0.5
    )
    with pytest.raises(ValueError, match="non-square"):
        tokens_per_tile(oblong)


def _fake_processor(real, height=28, width=28, seq=4):
    """The attributes check_internvl_layout reads, with the real tokenizer and image token."""
    return SimpleNamespace(
        image_processor=SimpleNamespace(size={"height": height, "width": width}),
        image_seq_length=seq,
        tokenizer=real.tokenizer,
        image_token=real.image_token,
    )


def test_check_internvl_layout_accepts_the_tiny_model_and_refuses_mismatches(internvl_config):
    """The tiny model's own processor passes; a tile side, a tokens-per-tile count (processor's or
    config's) or an image-context token id unlike the model's each raise a ValueError naming it."""
    from vlcal_verl.verl_ext.model_config import check_internvl_layout

    proc, cfg = internvl_config.processor, internvl_config.hf_config
    check_internvl_layout(proc, cfg)
    check_internvl_layout(_fake_processor(proc), cfg)

    def refused(processor, config):
        with pytest.raises(ValueError, match="InternVL processor and model disagree") as err:
            check_internvl_layout(processor, config)
        return str(err.value)

    msg = refused(_fake_processor(proc, 56, 56), cfg)
    assert "image processor tiles" in msg and "28×28" in msg and "tokens per tile" not in msg
    assert "tokens per tile: processor 16" in refused(_fake_processor(proc, seq=16), cfg)
    bad_seq = copy.deepcopy(cfg)
    bad_seq.image_seq_length = 16
    assert "config 16, vision tower 4" in refused(proc, bad_seq)
    bad_id = copy.deepcopy(cfg)
    bad_id.image_token_id = 151655  # Qwen's <|image_pad|>
    msg = refused(proc, bad_id)
    assert "<IMG_CONTEXT> is id" in msg and "image_token_id is 151655" in msg


def test_saved_processor_reloads_as_transformers_own(tmp_path):
    """verl saves the processor beside each HF checkpoint; AutoProcessor must get InternVLProcessor back
    (under the subclass's name it fell back to the bare tokenizer and `vlcal eval` failed)."""
    from transformers import AutoProcessor, InternVLProcessor

    from vlcal_verl.testing.tiny_models import build_tiny_vlm
    from vlcal_verl.verl_ext.model_config import VerlInternVLProcessor

    proc = VerlInternVLProcessor.from_pretrained(build_tiny_vlm("internvl"))
    proc.save_pretrained(tmp_path)
    back = AutoProcessor.from_pretrained(tmp_path)
    assert type(back) is InternVLProcessor
    assert back.image_seq_length == proc.image_seq_length and back.chat_template == proc.chat_template
    assert dict(back.image_processor.to_dict(), image_processor_type=None) == dict(
        proc.image_processor.to_dict(), image_processor_type=None
    )
