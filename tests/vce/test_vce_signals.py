"""KL_t / H_t from real tiny-VLM forwards against brute-force full-logit computations (float64)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from vlcal_verl.config import VCEConfig
from vlcal_verl.vce import capture_response_hidden, compute_vce_signals, token_kl_entropy
from vlcal_verl.vce_batch import build_vce_batch
from vlcal_verl.vce_mask import batch_cell_masks, black_row_for, mask_pixel_values

FAMILIES = ("qwen3-vl", "qwen2.5-vl")
SPANS = [(2, 10), (0, 12), None, (5, 6)]


@pytest.fixture(scope="module")
def f64(tiny_vlms):
    """float64 copies: brute force and the chunked path then agree to ~1e-12, so 1e-6 is a real test."""
    return {fam: (copy.deepcopy(m).double(), p) for fam, (m, p) in tiny_vlms.items()}


def _batch(processor, seed=0):
    rng = np.random.default_rng(seed)

    def img(w, h):
        return Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8"))

    def prompt(k, q):
        content = [{"type": "image"}] * k + [{"type": "text", "text": q}]
        msgs = [{"role": "user", "content": content}]
        return processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)

    prompts = [
        prompt(1, "What?"),
        prompt(2, "What shape is it, really, in this picture?"),
        prompt(1, "x"),
        prompt(1, "Colour?"),
    ]
    images = [[img(64, 64)], [img(96, 64), img(32, 32)], [img(64, 96)], [img(64, 64)]]
    responses = [rng.integers(0, 151000, size=n).tolist() for n in (20, 12, 16, 9)]
    return build_vce_batch(processor, prompts, images, responses, ["a", "b", "c", "d"])


def _as(batch, dtype):
    return dict(batch, pixel_values=batch["pixel_values"].to(dtype))


def _full_logits(model, batch, pixel_values):
    keys = ("input_ids", "attention_mask", "image_grid_thw", "mm_token_type_ids")
    inputs = {k: batch[k] for k in keys if k in batch}
    return model(**inputs, pixel_values=pixel_values).logits


def _brute(model, processor, batch, cfg):
    """Full-sequence logits for both images, then KL/H by the textbook formulas (no chunks, no gather)."""
    grid = batch["image_grid_thw"]
    masks = batch_cell_masks(grid, [1, 2, 1, 1], batch["uid"], cfg.mask_prob, cfg.seed, 2)
    masked_pv = mask_pixel_values(batch["pixel_values"], grid, masks, 2, black_row_for(processor))
    lo = _full_logits(model, batch, batch["pixel_values"]).double()
    lm = _full_logits(model, batch, masked_pv).double()
    r = batch["responses"].shape[1]
    lo, lm = lo[:, -r - 1 : -1], lm[:, -r - 1 : -1]  # state at column P+t−1 predicts response token t
    p, q = torch.softmax(lo, -1), torch.softmax(lm, -1)
    kl = (p * (torch.log(p) - torch.log(q))).sum(-1)
    ent = -(p * torch.log(p)).sum(-1)
    y = batch["responses"].unsqueeze(-1)
    lpo, lpm = torch.log(p.gather(-1, y)).squeeze(-1), torch.log(q.gather(-1, y)).squeeze(-1)
    k3 = torch.exp(lpm - lpo) - (lpm - lpo) - 1
    ref = (torch.exp(lpo) * (lpo - lpm).clamp(-20, 20)).clamp(0, 10)
    return {"exact": kl, "k3": k3, "reference": ref}, ent


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_estimators_match_brute_force(f64, family):
    model, processor = f64[family]
    batch = _as(_batch(processor), torch.float64)
    brute, ent = None, None
    for est in ("exact", "k3", "reference"):
        cfg = VCEConfig(estimator=est, vocab_chunk_tokens=5, mask_prob=0.8)
        sig = compute_vce_signals(model, batch, SPANS, cfg, processor=processor)
        if brute is None:
            brute, ent = _brute(model, processor, batch, cfg)
        m = sig.span_mask
        assert torch.equal(m, sig.computed_mask)
        assert m.sum(-1).tolist() == [8, 12, 0, 1]
        assert torch.allclose(sig.kl[m].double(), brute[est][m], atol=1e-6, rtol=0)
        assert torch.allclose(sig.entropy[m].double(), ent[m], atol=1e-6, rtol=0)
        assert (sig.kl[~m] == 0).all() and sig.has_span.tolist() == [True, True, False, True]
    assert brute["exact"][m].min() > 0  # masking really moves the distribution


@pytest.mark.parametrize("family", FAMILIES)
def test_truncated_and_full_scopes_agree_on_span(f64, family):
    model, processor = f64[family]
    batch = _as(_batch(processor, seed=1), torch.float64)
    trunc = compute_vce_signals(model, batch, SPANS, VCEConfig(scope="truncated"), processor=processor)
    full = compute_vce_signals(model, batch, SPANS, VCEConfig(scope="full"), processor=processor)
    m = trunc.span_mask
    assert torch.allclose(trunc.kl[m], full.kl[m], atol=1e-9) and torch.allclose(
        trunc.entropy[m], full.entropy[m]
    )
    # full scope covers every valid response token of samples with a span
    assert full.computed_mask.sum(-1).tolist() == [20, 12, 0, 9]


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_invariance_batch_vs_single(f64, family):
    model, processor = f64[family]
    batch = _as(_batch(processor, seed=2), torch.float64)
    sig = compute_vce_signals(model, batch, SPANS, VCEConfig(), processor=processor)
    counts = batch["image_grid_thw"].prod(-1).tolist()
    starts = np.cumsum([0, *counts]).tolist()
    img_of = [[0], [1, 2], [3], [4]]
    for i in (0, 1, 3):
        r_len = int(batch["response_mask"][i].sum())
        keep = batch["attention_mask"][i, : -batch["responses"].shape[1]].bool()
        ids = torch.cat([batch["input_ids"][i, : keep.numel()][keep], batch["responses"][i, :r_len]])
        pv = torch.cat([batch["pixel_values"][starts[k] : starts[k + 1]] for k in img_of[i]])
        single = {
            "input_ids": ids[None],
            "attention_mask": torch.ones(1, ids.numel(), dtype=torch.long),
            "responses": batch["responses"][i : i + 1, :r_len],
            "pixel_values": pv,
            "image_grid_thw": batch["image_grid_thw"][img_of[i]],
            "uid": [batch["uid"][i]],
        }
        one = compute_vce_signals(model, single, [SPANS[i]], VCEConfig(), processor=processor)
        assert torch.allclose(one.kl[0], sig.kl[i, :r_len], atol=1e-9)
        assert torch.allclose(one.entropy[0], sig.entropy[i, :r_len], atol=1e-9)


@pytest.mark.parametrize("family", FAMILIES)
def test_masking_changes_only_image_rows(tiny_vlms, family, monkeypatch):
    model, processor = tiny_vlms[family]
    batch = _batch(processor, seed=3)
    calls = []
    real = model.model.forward

    def spy(**kw):
        calls.append({k: (v.clone() if torch.is_tensor(v) else v) for k, v in kw.items()})
        return real(**kw)

    monkeypatch.setattr(model.model, "forward", spy)
    sig = compute_vce_signals(model, batch, SPANS, VCEConfig(), processor=processor)
    masked, orig = calls  # masked forward first, then the original (no orig_hidden given)
    n = masked["input_ids"].shape[1]
    assert n == batch["input_ids"].shape[1] - batch["responses"].shape[1] + 11  # P + last span token (11)
    for k in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw"):
        assert torch.equal(masked[k], orig[k]) and torch.equal(
            masked[k], batch[k][..., :n] if k != "image_grid_thw" else batch[k]
        )
    changed = (masked["pixel_values"] != batch["pixel_values"]).any(-1)
    assert torch.equal(orig["pixel_values"], batch["pixel_values"])
    black = black_row_for(processor)
    assert torch.equal(masked["pixel_values"][changed], black.expand(int(changed.sum()), -1))
    assert 0 < changed.float().mean() < 1
    assert sig.has_span.sum() == 3


@pytest.mark.parametrize("family", FAMILIES)
def test_captured_hidden_states_replace_the_original_forward(tiny_vlms, family):
    model, processor = tiny_vlms[family]
    batch = _batch(processor, seed=4)
    with capture_response_hidden(model, batch["responses"].shape[1]) as store, torch.no_grad():
        _full_logits(model, batch, batch["pixel_values"])
    a = compute_vce_signals(
        model, batch, SPANS, VCEConfig(), processor=processor, orig_hidden=store["hidden"]
    )
    b = compute_vce_signals(model, batch, SPANS, VCEConfig(), processor=processor)
    assert torch.allclose(a.kl, b.kl, atol=1e-6) and torch.allclose(a.entropy, b.entropy, atol=1e-5)


def test_no_spans_and_bad_inputs(tiny_vlms):
    model, processor = tiny_vlms["qwen3-vl"]
    batch = _batch(processor)
    sig = compute_vce_signals(model, batch, [None] * 4, VCEConfig(), processor=processor)
    assert not sig.computed_mask.any() and (sig.kl == 0).all() and not sig.has_span.any()
    with pytest.raises(ValueError, match="uid"):
        compute_vce_signals(model, dict(batch, uid=["a"]), SPANS, VCEConfig(), processor=processor)
    with pytest.raises(ValueError, match="spans"):
        compute_vce_signals(model, batch, SPANS[:2], VCEConfig(), processor=processor)


def test_token_kl_entropy_hand_values():
    lo = torch.log(torch.tensor([[0.5, 0.25, 0.25]], dtype=torch.float64))
    lm = torch.log(torch.tensor([[0.25, 0.5, 0.25]], dtype=torch.float64))
    y = torch.tensor([0])
    kl, h = token_kl_entropy(lo, lm, y, "exact")
    assert kl.item() == pytest.approx(0.5 * np.log(2) + 0.25 * np.log(0.5))
    assert h.item() == pytest.approx(1.5 * np.log(2))
    d = np.log(0.25) - np.log(0.5)
    assert token_kl_entropy(lo, lm, y, "k3")[0].item() == pytest.approx(np.exp(d) - d - 1)
    assert token_kl_entropy(lo, lm, y, "reference")[0].item() == pytest.approx(0.5 * np.log(2))
    with pytest.raises(ValueError, match="estimator"):
        token_kl_entropy(lo, lm, y, "k2")


@pytest.mark.parametrize("estimator", ["exact", "k3"])
def test_call_root_mode_matches_hidden_mode(tiny_vlms, estimator):
    model, processor = tiny_vlms["qwen2.5-vl"]
    batch = _batch(processor, seed=5)
    cfg = VCEConfig(estimator=estimator, vocab_chunk_tokens=4)
    a = compute_vce_signals(model, batch, SPANS, cfg, processor=processor)
    b = compute_vce_signals(model, batch, SPANS, cfg, processor=processor, call_root=True)
    assert torch.allclose(a.kl, b.kl, atol=1e-6) and torch.allclose(a.entropy, b.entropy, atol=1e-5)
