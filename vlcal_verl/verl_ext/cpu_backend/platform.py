"""verl platform ``"cpu"``: verl's device abstraction answered by the host CPU.

verl 0.9.1 reaches the accelerator only through :mod:`verl.plugin.platform` (``get_platform()``) and
the module it returns as ``get_torch_device()``. Registering :class:`PlatformCPU` under the name
``"cpu"`` and selecting it with ``VERL_PLATFORM=cpu`` (set for every Ray worker through the runtime
env) is therefore enough for verl's workers, engines and trainer to run on the host CPU.

Two details matter:

- :func:`current_device` returns the string ``"cpu"``: verl writes ``tensor.to(get_device_id())``,
  and an integer there means a CUDA device.
- The Ray resource name stays ``"GPU"``: verl's resource pools count only GPU/NPU resources
  (``single_controller/ray/base.py``), so the local Ray head advertises as many *logical* GPUs as there
  are FSDP ranks (:mod:`vlcal_verl.verl_ext.cpu_backend.ray_local`). Nothing ever touches a GPU.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import psutil
import torch
from verl.plugin.platform.platform_base import PlatformBase
from verl.plugin.platform.platform_manager import PlatformRegistry

PLATFORM_NAME = "cpu"


class CPUDeviceModule:
    """``torch.cpu`` plus the ``torch.cuda`` functions verl calls that ``torch.cpu`` lacks.

    Memory figures come from the process RSS and the host's free memory (psutil); the RNG state is
    the default CPU generator's. Everything else is delegated to ``torch.cpu``.
    """

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cpu, name)

    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def current_device() -> str:
        return "cpu"

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def set_device(_device: Any = None) -> None:
        return None

    @staticmethod
    def get_device_name(_device: Any = None) -> str:
        return "cpu"

    @staticmethod
    def empty_cache() -> None:
        return None

    @staticmethod
    def ipc_collect() -> None:
        return None

    @staticmethod
    def set_per_process_memory_fraction(_fraction: float, _device: Any = None) -> None:
        return None

    @staticmethod
    def mem_get_info(_device: Any = None) -> tuple[int, int]:
        vm = psutil.virtual_memory()
        return int(vm.available), int(vm.total)

    @staticmethod
    def memory_allocated(_device: Any = None) -> int:
        return int(psutil.Process().memory_info().rss)

    memory_reserved = memory_allocated
    max_memory_allocated = memory_allocated
    max_memory_reserved = memory_allocated

    @staticmethod
    def reset_peak_memory_stats(_device: Any = None) -> None:
        return None

    @staticmethod
    def memory_stats(_device: Any = None) -> dict[str, int]:
        return {"allocated_bytes.all.current": int(psutil.Process().memory_info().rss)}

    @staticmethod
    def get_rng_state(_device: Any = None) -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state: torch.Tensor, _device: Any = None) -> None:
        torch.set_rng_state(state)

    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)

    manual_seed_all = manual_seed


class PlatformCPU(PlatformBase):
    """verl ``PlatformBase`` for the host CPU (gloo collectives, no IPC, no profiler ranges)."""

    _module = CPUDeviceModule()

    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self) -> Any:
        return self._module

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check: bool = False) -> bool:
        # never auto-detected: only an explicit VERL_PLATFORM=cpu selects it
        return os.environ.get("VERL_PLATFORM", "").strip().lower() == PLATFORM_NAME

    def current_device(self) -> str:  # type: ignore[override]
        return "cpu"

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        return None

    def synchronize(self, device_index: int | None = None) -> None:
        return None

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        return None

    def empty_cache(self) -> None:
        return None

    def get_device_capability(self, device_index: int = 0) -> tuple[int | None, int | None]:
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        # Ray sets CUDA_VISIBLE_DEVICES for the logical GPUs it hands out; verl reads it back
        return "CUDA_VISIBLE_DEVICES"

    @contextlib.contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        return None

    def profiler_stop(self) -> None:
        return None

    def ray_resource_name(self) -> str:
        return "GPU"

    def ray_noset_envvars(self) -> list[str]:
        return ["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"]

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self) -> Any:
        return None


def register_platform() -> None:
    """Make ``VERL_PLATFORM=cpu`` resolve to :class:`PlatformCPU` (idempotent)."""
    if PlatformRegistry.get(PLATFORM_NAME) is not PlatformCPU:
        PlatformRegistry.register(platform=PLATFORM_NAME)(PlatformCPU)
