"""verl's FSDP engines on device ``"cpu"``, registered through ``EngineRegistry``.

verl 0.9.1 registers ``FSDPEngineWithLMHead`` for devices ``cuda`` and ``npu`` only
(``workers/engine/fsdp/transformer_impl.py``). FSDP2 (``fully_shard``) itself runs on CPU tensors over a
gloo process group, so the CPU engine is verl's engine with one difference: the forward-only
(reference) engine builds ``CPUOffloadPolicy(pin_memory=True)``, and pinned host memory needs a GPU
driver. :class:`CPUFSDPEngineWithLMHead` builds the same policy without pinning — on a CPU the
"offloaded" parameters already live where compute happens.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

from verl.workers.engine.base import EngineRegistry
from verl.workers.engine.fsdp import transformer_impl
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

DEVICE = "cpu"


@contextlib.contextmanager
def _unpinned_offload_policy() -> Iterator[None]:
    """Within the block, verl's engine module builds ``CPUOffloadPolicy(pin_memory=False)``."""
    original = transformer_impl.CPUOffloadPolicy

    @functools.wraps(original)
    def unpinned(*args, **kwargs):
        return original(*args, **{**kwargs, "pin_memory": False})

    transformer_impl.CPUOffloadPolicy = unpinned
    try:
        yield
    finally:
        transformer_impl.CPUOffloadPolicy = original


class CPUFSDPEngineWithLMHead(FSDPEngineWithLMHead):
    """``FSDPEngineWithLMHead`` whose reference (forward-only) engine does not pin host memory."""

    def _build_fsdp_module(self, module):
        with _unpinned_offload_policy():
            return super()._build_fsdp_module(module)


def register_engines() -> None:
    """Register the CPU engine for ``language_model`` with backends ``fsdp``/``fsdp2`` (idempotent)."""
    registry = EngineRegistry._engines.get("language_model", {})
    backends = [b for b in ("fsdp", "fsdp2") if DEVICE not in registry.get(b, {})]
    if backends:
        EngineRegistry.register(model_type="language_model", backend=backends, device=DEVICE)(
            CPUFSDPEngineWithLMHead
        )
