"""InternVL's dummy vision forward: an image-less micro-batch still runs the vision tower (so FSDP ranks
gather and reduce its shards alike) without changing a single value."""

from __future__ import annotations

import queue
import socket
import time

import pytest
import torch
import torch.distributed as dist

from vlcal_verl.testing.fsdp_pair import fsdp_rank, image_batch, loss_of, text_batch
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


def _vision_grads(model) -> list:
    return [
        p.grad for n, p in model.named_parameters() if "vision_tower" in n or "multi_modal_projector" in n
    ]


def test_text_only_forward_runs_the_vision_tower_without_changing_values(gloo):
    model, processor = load_tiny_vlm("internvl")
    model.train()
    batch = text_batch(processor)
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
    model, processor = load_tiny_vlm("internvl")
    enc = image_batch(processor)
    with torch.no_grad():
        before = model(**enc).logits
        install_dummy_vision_forward(model)
        after = model(**enc).logits
    assert torch.equal(before, after)


def test_fsdp2_ranks_with_and_without_images_train_as_one_model():
    """Two gloo ranks under verl's ``apply_fsdp2`` (embeddings untied: ``embed_tokens`` is its own unit),
    one micro-batch with an image beside one without, then swapped: every collective pairs up (a wrong order
    is gloo's size-mismatch abort, or a silent mix of shards), the losses are the unsharded model's and the
    reduced gradients are the mean of the two ranks' unsharded gradients (brute force, one process)."""
    import torch.multiprocessing as mp

    model, processor = load_tiny_vlm("internvl")
    batches = [image_batch(processor), text_batch(processor)]
    expected_losses = []
    for batch in batches:
        loss = loss_of(model, batch)
        loss.backward()
        expected_losses.append(loss.item())
    # each rank accumulates g_img + g_txt; FSDP averages the ranks' (equal) sums
    expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=fsdp_rank, args=(r, port, results)) for r in range(2)]
    for p in procs:
        p.start()
    got, deadline = {}, time.monotonic() + 240
    try:
        while len(got) < 2 and time.monotonic() < deadline:
            try:
                rank, losses, grads = results.get(timeout=2)
                got[rank] = (losses, grads)
            except queue.Empty:
                if not any(p.is_alive() for p in procs):
                    break
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert len(got) == 2, f"a rank died without reporting (exit codes {[p.exitcode for p in procs]})"
    for rank, (losses, grads) in got.items():
        assert grads is not None, f"rank {rank} failed:\n{losses}"
        assert losses == pytest.approx([expected_losses[rank], expected_losses[1 - rank]], rel=1e-5)
        assert set(grads) == set(expected)
        for name, grad in grads.items():
            torch.testing.assert_close(torch.from_numpy(grad), expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_other_architectures_are_not_hooked():
    model, _ = load_tiny_vlm("qwen3-vl")
    assert install_dummy_vision_forward(model) == 0
