"""Rank agreement and durable files: what the trainer's checkpoints and dsv3-convert share, without megatron-core."""
from __future__ import annotations

import os
from pathlib import Path

import torch.distributed as dist


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    return dist.barrier() if dist.is_initialized() else None


def broadcast(obj):
    """Rank 0's value of `obj` on every rank (so all ranks agree on names and outcomes)."""
    if not dist.is_initialized() or world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def fsync_file(path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """Flush every file and directory under `path` (and `path` itself) to stable storage."""
    for root, dirs, files in os.walk(path):
        for name in files:
            fsync_file(os.path.join(root, name))
        fsync_dir(Path(root))
