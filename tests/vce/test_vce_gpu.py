"""The VCE driver on CUDA: same KL_t/H_t as on CPU (float32), finite in bf16. Skipped without a GPU."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from vlcal_verl.config import VCEConfig
from vlcal_verl.vce import capture_response_hidden, compute_vce_signals
from vlcal_verl.vce_batch import build_vce_batch

pytestmark = pytest.mark.gpu
SPANS = [(1, 9), None, (0, 5)]


def _batch(processor):
    rng = np.random.default_rng(0)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}]
    prompt = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    imgs = [[Image.fromarray((rng.random((64, 64, 3)) * 255).astype("uint8"))] for _ in range(3)]
    resp = [rng.integers(0, 151000, size=n).tolist() for n in (12, 7, 10)]
    return build_vce_batch(processor, [prompt] * 3, imgs, resp, ["a", "b", "c"])


def _to(batch, device, dtype):
    out = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
    out["pixel_values"] = out["pixel_values"].to(dtype)
    return out


@pytest.mark.parametrize("family", ["qwen3-vl", "qwen2.5-vl"])
def test_cuda_matches_cpu_and_bf16_is_finite(tiny_vlms, family):
    model, processor = tiny_vlms[family]
    batch = _batch(processor)
    cpu = compute_vce_signals(model, batch, SPANS, VCEConfig(), processor=processor)
    gpu_model = copy.deepcopy(model).cuda()
    gpu = compute_vce_signals(
        gpu_model, _to(batch, "cuda", torch.float32), SPANS, VCEConfig(), processor=processor
    )
    assert torch.allclose(cpu.kl, gpu.kl, atol=1e-5) and torch.allclose(cpu.entropy, gpu.entropy, atol=1e-4)
    bf16 = gpu_model.to(torch.bfloat16)
    b16 = _to(batch, "cuda", torch.bfloat16)
    with capture_response_hidden(bf16, b16["responses"].shape[1]) as store, torch.no_grad():
        bf16(
            **{
                k: b16[k]
                for k in (
                    "input_ids",
                    "attention_mask",
                    "pixel_values",
                    "image_grid_thw",
                    "mm_token_type_ids",
                )
            }
        )
    sig = compute_vce_signals(bf16, b16, SPANS, VCEConfig(), processor=processor, orig_hidden=store["hidden"])
    m = sig.span_mask
    assert torch.isfinite(sig.kl[m]).all() and (sig.kl[m] >= 0).all()
    assert torch.allclose(sig.entropy[m], cpu.entropy[m], atol=0.1)
