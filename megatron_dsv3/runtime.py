"""Process-group, model-parallel and RNG set-up: torchrun (env://) or a single process, gloo or NCCL."""
from __future__ import annotations

import os
import random
from datetime import timedelta
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from megatron_dsv3 import compat


def te_available() -> bool:
    """Transformer Engine is usable: importable and a CUDA device present."""
    import importlib.util

    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def device() -> torch.device:
    """Where this rank computes and communicates: its CUDA device under NCCL, else the CPU (gloo)."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _init_process_group(backend: str, timeout: Optional[timedelta]) -> None:
    extra = {} if timeout is None else {"timeout": timeout}
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend=backend, init_method="env://", **extra)
    else:
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, **extra)


def initialize(tp: int = 1, pp: int = 1, ep: int = 1, backend: Optional[str] = None, seed: int = 1234,
               timeout_minutes: Optional[float] = None) -> None:
    """Initialise torch.distributed, megatron-core's model-parallel groups and RNG streams.

    Under torchrun the process group comes from env://; otherwise a one-process group is made. The backend
    defaults to NCCL with CUDA and gloo without. `timeout_minutes` bounds every collective (Megatron-LM's
    --distributed-timeout-minutes): a rank that waits longer for a dead peer raises instead of hanging.
    Calling again with other sizes rebuilds the groups.
    """
    cuda = torch.cuda.is_available()
    compat.apply_no_te_patches()
    if not cuda:
        compat.apply_cpu_patches()
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        timeout = None if timeout_minutes is None else timedelta(minutes=timeout_minutes)
        _init_process_group(backend or ("nccl" if cuda else "gloo"), timeout)
    world = dist.get_world_size()
    for name, size in (("tp", tp), ("pp", pp), ("ep", ep)):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"{name}: expected a positive integer, got {size!r}")
    if world % (tp * pp):
        raise ValueError(f"tp * pp = {tp * pp} does not divide the world size {world}")
    if (world // (tp * pp)) % ep:
        raise ValueError(f"ep = {ep} does not divide the data-parallel size {world // (tp * pp)}")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep
    )
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def shutdown() -> None:
    """Destroy model-parallel groups and the process group."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
