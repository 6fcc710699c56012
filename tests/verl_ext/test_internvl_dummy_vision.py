"""InternVL's dummy vision forward: an image-less micro-batch still runs the vision tower (so FSDP ranks
gather and reduce its shards alike) without changing a single value."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist

from vlcal_verl.testing.tiny_models import load_tiny_vlm
from vlcal_verl.verl_ext.model_config import install_dummy_vision_forward


@pytest.fixture(scope="module")
def gloo():
    created = not dist.is_initialized()
    if created:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    if created:
        dist.destroy_process_group()


def _text_batch(processor):
    ids = processor.tokenizer("a text-only prompt, no image at all", return_tensors="pt")["input_ids"]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _vision_grads(model) -> list:
    return [
        p.grad for n, p in model.named_parameters() if "vision_tower" in n or "multi_modal_projector" in n
    ]


def test_text_only_forward_runs_the_vision_tower_without_changing_values(gloo):
    model, processor = load_tiny_vlm("internvl")
    model.train()
    batch = _text_batch(processor)
    plain = model(**batch).logits.detach()
    model.zero_grad()
    model(**batch).logits.sum().backward()
    assert all(g is None for g in _vision_grads(model))  # HF's forward skips the tower: FSDP would hang

    assert install_dummy_vision_forward(model) == 1
    assert install_dummy_vision_forward(model) == 1  # idempotent: one hook
    model.zero_grad()
    out = model(**batch).logits
    assert torch.equal(out.detach(), plain)  # 0 × features: bit-identical logits
    out.sum().backward()
    grads = _vision_grads(model)
    assert grads and all(g is not None and torch.count_nonzero(g) == 0 for g in grads)  # reduced, all zero


def test_forward_with_images_is_untouched(gloo):
    from PIL import Image

    model, processor = load_tiny_vlm("internvl")
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    enc = processor(text=[text], images=[Image.new("RGB", (56, 28), (200, 30, 30))], return_tensors="pt")
    with torch.no_grad():
        before = model(**enc).logits
        install_dummy_vision_forward(model)
        after = model(**enc).logits
    assert torch.equal(before, after)


def test_other_architectures_are_not_hooked():
    model, _ = load_tiny_vlm("qwen3-vl")
    assert install_dummy_vision_forward(model) == 0
