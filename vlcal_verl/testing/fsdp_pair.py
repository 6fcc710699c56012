"""Two gloo ranks training a tiny VLM under verl's own FSDP2 wrapping (a spawn target for tests).

:func:`fsdp_rank` runs in a spawned process: it joins a two-rank gloo group, wraps the tiny InternVL with
``verl.utils.fsdp_utils.apply_fsdp2`` (what verl's FSDP engine does), installs the dummy vision forward,
and runs two micro-batches — rank 0 with an image then without, rank 1 the other way round — each a
forward and a backward. It puts ``(rank, losses, full gradients as numpy arrays)`` on the queue (pickled by value: torch
tensors would travel as shared memory that dies with the process), or ``(rank, traceback,
None)`` when anything fails (a gloo abort kills the process instead: the caller's queue read times out).
"""

from __future__ import annotations

import traceback
from typing import Any

import torch


def image_batch(processor: Any, colour: tuple[int, int, int] = (200, 30, 30)) -> dict[str, torch.Tensor]:
    """One prompt with one 56×28 image of ``colour``, as the processor encodes it."""
    from PIL import Image

    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    return dict(processor(text=[text], images=[Image.new("RGB", (56, 28), colour)], return_tensors="pt"))


def text_batch(processor: Any) -> dict[str, torch.Tensor]:
    """One prompt without an image."""
    ids = processor.tokenizer("a text-only prompt, no image at all", return_tensors="pt")["input_ids"]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def loss_of(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """A loss that reaches every logit: mean squared logit."""
    return model(**batch).logits.float().square().mean()


def fsdp_rank(rank: int, port: int, results: Any) -> None:
    """One of two ranks (see the module docstring)."""
    import torch.distributed as dist

    from vlcal_verl.testing.tiny_models import load_tiny_vlm
    from vlcal_verl.verl_ext.model_config import install_dummy_vision_forward

    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy
        from verl.utils.fsdp_utils import apply_fsdp2

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
        model, processor = load_tiny_vlm("internvl")
        batches = [image_batch(processor), text_batch(processor)]
        mesh = init_device_mesh("cpu", (2,))
        mp = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
        apply_fsdp2(model, {"mesh": mesh, "mp_policy": mp, "reshard_after_forward": True}, {})
        install_dummy_vision_forward(model)
        losses = []
        for micro in range(2):
            loss = loss_of(model, batches[(rank + micro) % 2])
            loss.backward()
            losses.append(loss.item())
        grads = {n: p.grad.full_tensor().numpy() for n, p in model.named_parameters() if p.grad is not None}
        results.put((rank, losses, grads))
    except BaseException:
        results.put((rank, traceback.format_exc(), None))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
