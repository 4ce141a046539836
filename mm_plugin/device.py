"""The active device: CUDA where available, else an Ascend NPU (torch_npu), else the CPU.

megatron-core assumes CUDA; the device-adaptation patches send its CUDA calls here. Everything in the
package that needs "the device" asks this module, so one process never mixes devices.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Any, Union

import torch

DeviceLike = Union[str, int, torch.device, None]


@functools.lru_cache(maxsize=None)
def _npu_available() -> bool:
    if importlib.util.find_spec("torch_npu") is None:
        return False
    import torch_npu  # noqa: F401  (registers torch.npu)

    return bool(torch.npu.is_available())


def kind() -> str:
    """``"cuda"``, ``"npu"`` or ``"cpu"``; ``MM_PLUGIN_DEVICE=cpu`` forces the CPU."""
    forced = os.environ.get("MM_PLUGIN_DEVICE")
    if forced:
        if forced not in ("cuda", "npu", "cpu"):
            raise ValueError(f"MM_PLUGIN_DEVICE={forced!r}: use cuda, npu or cpu")
        return forced
    if torch.cuda.is_available():
        return "cuda"
    if _npu_available():
        return "npu"
    return "cpu"


def module() -> Any:
    """The torch submodule of the active device (``torch.cuda``, ``torch.npu`` or ``torch.cpu``)."""
    return getattr(torch, kind())


def current() -> torch.device:
    """The device this process computes on (``cuda:N``/``npu:N`` for the current index, or ``cpu``)."""
    name = kind()
    if name == "cpu":
        return torch.device("cpu")
    return torch.device(name, module().current_device())


def set_local_rank(local_rank: int) -> None:
    """Select this process's accelerator by its local rank (no-op on the CPU)."""
    if kind() != "cpu":
        module().set_device(local_rank % module().device_count())


def distributed_backend() -> str:
    return {"cuda": "nccl", "npu": "hccl", "cpu": "gloo"}[kind()]


def redirect(device: DeviceLike) -> DeviceLike:
    """Map a device that megatron-core hard-codes as CUDA (``"cuda"``, ``"cuda:0"``, an index) to the active one."""
    if kind() == "cuda" or device is None:
        return device
    if isinstance(device, int) or (isinstance(device, str) and device.split(":")[0] == "cuda"):
        return current()
    if isinstance(device, torch.device) and device.type == "cuda":
        return current()
    return device


def get_rng_state() -> torch.Tensor:
    """The generator state of the active device (on the CPU: the default CPU generator)."""
    if kind() == "cpu":
        return torch.get_rng_state()
    return module().get_rng_state()


def set_rng_state(state: torch.Tensor) -> None:
    if kind() == "cpu":
        torch.set_rng_state(state)
    else:
        module().set_rng_state(state)


def manual_seed(seed: int) -> None:
    if kind() == "cpu":
        torch.manual_seed(seed)
    else:
        module().manual_seed(seed)


def synchronize() -> None:
    module().synchronize()


def peak_memory_bytes() -> int:
    """Peak memory allocated on the accelerator since start (0 on the CPU: use RSS instead)."""
    if kind() == "cpu":
        return 0
    return int(module().max_memory_allocated())


def free_memory_bytes() -> int:
    """Memory this process can still allocate on its device: the accelerator's free memory, or on the CPU
    the machine's available memory shared by the processes torchrun started on it."""
    if kind() == "cpu":
        import psutil

        return psutil.virtual_memory().available // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return int(module().mem_get_info()[0])
