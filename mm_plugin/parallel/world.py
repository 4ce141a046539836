"""Joining the process group and setting megatron's parallel groups: one way for training, inference,
conversion and the demo.

Under torchrun the process joins the launched world; a plain ``python`` process becomes a world of one
(loopback), so single-process tools need no launcher. The backend follows the active device.
"""

from __future__ import annotations

import datetime
import os
import random
import socket

import numpy
import torch
from megatron.core import parallel_state, tensor_parallel

from mm_plugin import device


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


DEFAULT_TIMEOUT_MINUTES = 10
"""How long a collective waits for a rank that stopped answering (a frozen or lost node) before the job ends:
Megatron-LM's default. Raise it (``--distributed-timeout-minutes``) when a legitimate pause is longer, e.g. a
rank writing a very large checkpoint to a slow file system while the others wait at the barrier."""


def world_size() -> int:
    """The world's size, before or after joining it: torchrun's ``WORLD_SIZE``, else a world of one."""
    if torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1)) if "RANK" in os.environ else 1


def join_world(timeout_minutes: int = DEFAULT_TIMEOUT_MINUTES) -> int:
    """Join (or make) the process group; returns the world size."""
    if not torch.distributed.is_initialized():
        device.set_local_rank(int(os.environ.get("LOCAL_RANK", 0)))
        launched = "RANK" in os.environ  # by torchrun; otherwise a world of one on a free loopback port
        torch.distributed.init_process_group(
            backend=device.distributed_backend(), timeout=datetime.timedelta(minutes=timeout_minutes),
            **({} if launched else dict(init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)))
    return torch.distributed.get_world_size()


def set_model_parallel(tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1, seed: int = 1234,
                       timeout_minutes: int = DEFAULT_TIMEOUT_MINUTES) -> None:
    """(Re)build megatron's TP/PP/DP groups for this layout and seed every generator (per pipeline stage,
    as Megatron-LM does; the tensor-parallel RNG tracker from ``seed``). The groups wait ``timeout_minutes``
    for a silent rank, as the world does (megatron-core's own default is 30)."""
    wanted = (tensor_parallel_size, pipeline_parallel_size)
    if parallel_state.model_parallel_is_initialized() and wanted != (
            parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size()):
        parallel_state.destroy_model_parallel()  # a process that runs again with another layout
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(*wanted, distributed_timeout_minutes=timeout_minutes)
    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(stage_seed)
    numpy.random.seed(stage_seed)
    torch.manual_seed(stage_seed)
    tensor_parallel.model_parallel_cuda_manual_seed(stage_seed)
