"""``vlcal eval --vce``: per-item K̄, H̄, S from batched evaluation equal one direct call of the training VCE
code per item (batch of one, on the tiny model), and S̃_vis is normalised within each benchmark."""

from __future__ import annotations

import math

import pytest
import torch

from vlcal_verl.config import VCEConfig
from vlcal_verl.evaluation.vce_eval import normalize_per_group, vce_scores

RESPONSES = [
    "<think><vision>a red circle on white</vision><reasoning>it is red</reasoning></think>\\boxed{yes}",
    "no tags at all",
    "<think><vision>blue</vision><reasoning>so</reasoning></think>\\boxed{no}",
    "<think><vision>a green triangle, small, top left corner</vision>",
]


@pytest.fixture(scope="module")
def tiny():
    from vlcal_verl.data.easy_vqa import load_easy_vqa
    from vlcal_verl.testing.tiny_models import load_tiny_vlm

    model, processor = load_tiny_vlm("qwen3-vl")
    model = model.double()  # float64: batched and single-item padding then agree to ~1e-12
    items = load_easy_vqa("test", limit=len(RESPONSES), seed=0)
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = [[*processor.tokenizer.encode(r), eos] for r in RESPONSES]
    return model, processor, items, ids


def _direct(model, processor, item, ids, cfg):
    """The training code on one item: build_vce_batch → vision_token_span → compute_vce_signals."""
    from vlcal_verl.data.schema import chat_messages
    from vlcal_verl.spans import vision_token_span
    from vlcal_verl.vce import compute_vce_signals, visual_certainty
    from vlcal_verl.vce_batch import build_vce_batch

    prompt = processor.apply_chat_template(
        chat_messages(item.question, "decoupled", 1), add_generation_prompt=True, tokenize=False
    )
    batch = build_vce_batch(processor, [prompt], [[item.image]], [ids], [item.uid])
    span = vision_token_span(ids, processor.tokenizer)
    sig = compute_vce_signals(model, batch, [span], cfg, processor=processor)
    return [float(x[0]) for x in visual_certainty(sig.kl, sig.entropy, sig.span_mask, cfg)]


def test_batched_scores_equal_direct_calls(tiny):
    model, processor, items, ids = tiny
    cfg = VCEConfig(seed=3)
    got = vce_scores(model, processor, items, ids, cfg=cfg, batch_size=3)  # 3 + 1: padding differs
    for item, row, out in zip(items, ids, got, strict=True):
        k, h, s = _direct(model, processor, item, row, cfg)
        if math.isnan(s):
            assert out == {"k_bar": None, "h_bar": None, "s": None}
        else:
            assert out["k_bar"] == pytest.approx(k, rel=1e-9)
            assert out["h_bar"] == pytest.approx(h, rel=1e-9)
            assert out["s"] == pytest.approx(s, rel=1e-9, abs=1e-9)
            assert out["k_bar"] > 0  # the masked image changed the distribution
    assert got[1]["s"] is None and got[0]["s"] is not None and got[3]["s"] is not None


def test_masks_are_seeded(tiny):
    model, processor, items, ids = tiny
    a = vce_scores(model, processor, items[:1], ids[:1], cfg=VCEConfig(seed=0))
    b = vce_scores(model, processor, items[:1], ids[:1], cfg=VCEConfig(seed=0))
    c = vce_scores(model, processor, items[:1], ids[:1], cfg=VCEConfig(seed=1))
    assert a == b and a[0]["k_bar"] != c[0]["k_bar"]


def test_normalisation_is_per_benchmark():
    s = [0.0, 2.0, None, 5.0, 9.0, 1.0]
    groups = ["a", "a", "a", "b", "b", "c"]
    out = normalize_per_group(s, groups)
    sig = torch.sigmoid(torch.tensor([-1.0, 1.0])).tolist()  # (x − mean)/std = ∓1 for two values
    assert out[0] == pytest.approx(sig[0]) and out[1] == pytest.approx(sig[1]) and out[2] is None
    assert out[3] == pytest.approx(sig[0]) and out[4] == pytest.approx(sig[1])
    assert out[5] == 0.5  # one item: std 0 → 0.5, as training's normalisation gives
