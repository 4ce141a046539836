"""Device adaptation: megatron-core's hard-coded CUDA calls go to the active device (CPU or NPU).

megatron-core calls ``torch.cuda.current_device()``, ``torch.cuda.get_rng_state()``,
``torch.zeros(..., device="cuda")``, ``tensor.cuda()`` and checks ``param.type() ==
"torch.cuda.FloatTensor"`` throughout. On CUDA nothing here applies. Elsewhere two narrow tools are
used, each only where megatron-core looks the name up, so a user's own ``"cuda"`` still fails loudly:

* ``TorchOnActiveDevice``: replaces the global name ``torch`` inside one megatron-core module. Its
  ``torch.cuda`` is the active device's module and its tensor factories map ``device="cuda"`` to the
  active device; every other attribute is the real ``torch``. No per-operator cost.
* ``on_active_device``: runs one megatron-core function under a ``TorchFunctionMode`` that maps
  ``tensor.cuda()``, ``tensor.type()`` and ``device="cuda"``. Used only for functions that call
  tensor methods (which no module global can reach): constructors, grad clipping, the 0.12 pipeline
  schedules — and there the mode is lifted around each micro-batch's forward and backward, so model
  code never runs under it.
"""

from __future__ import annotations

import contextlib
import inspect
import sys

import torch
import wrapt
from torch.overrides import TorchFunctionMode

from mm_plugin import device
from .registry import MEGATRON_CORE, Patch, wrapping


_FACTORIES = (
    "arange", "as_tensor", "empty", "empty_like", "empty_strided", "eye", "full", "full_like",
    "linspace", "ones", "ones_like", "rand", "randint", "randn", "randperm", "tensor", "zeros",
    "zeros_like",
)


def _not_on_cuda(_original) -> str | None:
    return "CUDA is the active device: megatron-core runs unchanged" if device.kind() == "cuda" else None


class _ActiveDeviceModule:
    """What ``torch.cuda`` means inside an adapted megatron-core module."""

    current_device = staticmethod(device.current)
    get_rng_state = staticmethod(lambda device_index=None: device.get_rng_state())
    set_rng_state = staticmethod(lambda state, device_index=None: device.set_rng_state(state))
    manual_seed = staticmethod(device.manual_seed)
    manual_seed_all = staticmethod(device.manual_seed)
    synchronize = staticmethod(lambda *args: device.synchronize())

    @property
    def random(self):  # megatron calls torch.cuda.random.get_rng_state(device=...)
        return self

    def __getattr__(self, name):
        accelerator = device.module()
        if hasattr(accelerator, name):
            return getattr(accelerator, name)
        return getattr(torch.cuda, name)


_ACTIVE_DEVICE_MODULE = _ActiveDeviceModule()


def _redirect_kwargs(kwargs: dict) -> dict:
    if "device" in kwargs:
        kwargs = dict(kwargs, device=device.redirect(kwargs["device"]))
    return kwargs


class TorchOnActiveDevice(wrapt.ObjectProxy):
    """The real ``torch`` module, except ``torch.cuda`` and ``device="cuda"`` in tensor factories."""

    @property
    def cuda(self):
        return _ACTIVE_DEVICE_MODULE


def _make_factory(name):
    def factory(self, *args, **kwargs):
        return getattr(torch, name)(*args, **_redirect_kwargs(kwargs))

    factory.__name__ = name
    return factory


for _name in _FACTORIES:
    setattr(TorchOnActiveDevice, _name, _make_factory(_name))


class _ActiveDeviceMode(TorchFunctionMode):
    """Maps ``tensor.cuda()``, ``tensor.type()`` and ``device="cuda"`` while a wrapped function runs."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = _redirect_kwargs(kwargs or {})
        if func is torch.Tensor.cuda:
            non_blocking = kwargs.get("non_blocking", False)
            return args[0].to(device.current(), non_blocking=non_blocking)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # megatron asks "is this an fp32/bf16/fp16 tensor on the accelerator?" by CUDA type name.
            name = func(*args)
            return name if ".cuda." in name else name.replace("torch.", "torch.cuda.", 1)
        return func(*args, **kwargs)


def _under_mode(wrapped, instance, args, kwargs):
    with _ActiveDeviceMode():
        return wrapped(*args, **kwargs)


@contextlib.contextmanager
def _mode_lifted():
    """Inside an ``on_active_device`` call, run a nested call (model forward/backward) without the mode."""
    from torch.overrides import _get_current_function_mode, _pop_mode_temporarily

    if isinstance(_get_current_function_mode(), _ActiveDeviceMode):
        with _pop_mode_temporarily():
            yield
    else:
        yield


def _without_mode(wrapped, instance, args, kwargs):
    with _mode_lifted():
        return wrapped(*args, **kwargs)


def _get_rng_state(wrapped, instance, args, kwargs):
    return device.get_rng_state()


def _set_rng_state(wrapped, instance, args, kwargs):
    state = args[0] if args else kwargs["new_state"]
    device.set_rng_state(state)


def _module_torch(module: str) -> Patch:
    return Patch(
        name=f"device.torch@{module.removeprefix('megatron.core.')}",
        target=f"{module}:torch",
        replace=TorchOnActiveDevice,
        reason=f"{module} calls torch.cuda.* and builds tensors with device='cuda'",
        versions=MEGATRON_CORE,
        guard=_not_on_cuda,
    )


def _function(name: str, target: str, wrapper, reason: str, guard=_not_on_cuda) -> Patch:
    return Patch(name=name, target=target, replace=wrapping(wrapper), reason=reason,
                 versions=MEGATRON_CORE, guard=guard)


def _schedule_uses_tensor_cuda(original) -> str | None:
    skip = _not_on_cuda(original)
    if skip is None and ".cuda()" not in _source(original):
        return "this schedule creates no tensor with .cuda()"
    return skip


def _pipelined_schedule_uses_tensor_cuda(_original) -> str | None:
    schedules = sys.modules[_SCHEDULES]
    return _schedule_uses_tensor_cuda(schedules.forward_backward_pipelining_without_interleaving)


def _source(function) -> str:
    try:
        return inspect.getsource(function)
    except (OSError, TypeError):
        return ""


_MODULES_WITH_CUDA_LOOKUPS = (
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.data",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.transformer.utils",
    "megatron.core.utils",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.async_utils",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.tensor_aware_state_dict",
)

_SCHEDULES = "megatron.core.pipeline_parallel.schedules"

PATCHES = [_module_torch(m) for m in _MODULES_WITH_CUDA_LOOKUPS] + [
    _function("device.rng_get", "megatron.core.tensor_parallel.random:_get_cuda_rng_state", _get_rng_state,
              "reads torch.cuda.default_generators, which a CPU/NPU build does not have"),
    _function("device.rng_set", "megatron.core.tensor_parallel.random:_set_cuda_rng_state", _set_rng_state,
              "on a CPU build it silently queues the state for a CUDA that never initialises"),
    _function("device.clip_vit_init", "megatron.core.models.vision.clip_vit_model:CLIPViTModel.__init__",
              _under_mode, "moves position ids with tensor.cuda()"),
    _function("device.broadcast_data", "megatron.core.tensor_parallel.data:broadcast_data", _under_mode,
              "moves the batch with tensor.cuda()"),
    _function("device.clip_grads", "megatron.core.optimizer.clip_grads:clip_grad_by_total_norm_fp32",
              _under_mode, "asserts param.grad.type() == 'torch.cuda.FloatTensor'"),
    _function("device.mixed_precision_optimizer_init",
              "megatron.core.optimizer.optimizer:Float16OptimizerWithFloat16Params.__init__", _under_mode,
              "sorts parameters by CUDA tensor type names"),
    _function("device.distributed_optimizer_init",
              "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer.__init__", _under_mode,
              "sorts parameters by CUDA tensor type names"),
    _function("device.grad_scaler_load", "megatron.core.optimizer.grad_scaler:DynamicGradScaler.load_state_dict",
              _under_mode, "moves the loss scale with tensor.cuda(device)"),
    _function("device.schedule_1f1b",
              f"{_SCHEDULES}:forward_backward_pipelining_without_interleaving", _under_mode,
              "megatron-core 0.12 counts tokens in torch.tensor(0).cuda()", guard=_schedule_uses_tensor_cuda),
    _function("device.schedule_interleaved",
              f"{_SCHEDULES}:forward_backward_pipelining_with_interleaving", _under_mode,
              "megatron-core 0.12 counts tokens in torch.tensor(0).cuda()", guard=_schedule_uses_tensor_cuda),
    _function("device.schedule_forward_step", f"{_SCHEDULES}:forward_step", _without_mode,
              "model code inside a pipeline schedule runs without the device mode",
              guard=_pipelined_schedule_uses_tensor_cuda),
    _function("device.schedule_backward_step", f"{_SCHEDULES}:backward_step", _without_mode,
              "model code inside a pipeline schedule runs without the device mode",
              guard=_pipelined_schedule_uses_tensor_cuda),
]
