"""Streaming access to megatron-core `torch_dist` checkpoints, one bounded group of tensors at a time.

megatron-core writes a distributed checkpoint in one call that stages everything it is given, so the
converter writes it in parts (one per Hugging Face shard) and merges them: the parts' data files are moved
into one folder and their PyTorch DCP `.metadata` are united (chunks of one tensor may come from several
parts; DCP reassembles and reshards them on load). Reading uses a DCP load planner that asks for arbitrary
regions (one expert of a stacked expert tensor, say), so only those bytes are read.
"""
from __future__ import annotations

import dataclasses
import os
import pickle
from pathlib import Path
from typing import Sequence

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, Metadata
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

from megatron_dsv3.checkpoint import safe_unpickle

DCP_METADATA = ".metadata"


def merge_parts(parts: Sequence[Path], dest: Path) -> None:
    """Move the data files of DCP checkpoints `parts` into `dest` and write their united `.metadata`.

    Non-tensor entries (megatron-core's `common_state`, `_extra_state` objects) and `metadata.json` come from
    the last part that has them, so the caller saves the common state last.
    """
    merged: Metadata | None = None
    dest.mkdir(parents=True, exist_ok=True)
    for i, part in enumerate(parts):
        md = FileSystemReader(str(part)).read_metadata()
        renamed = {}
        for name in sorted(os.listdir(part)):
            if name.endswith(".distcp"):
                renamed[name] = f"p{i:05d}{name}"
                os.replace(part / name, dest / renamed[name])
        md.storage_data = {idx: dataclasses.replace(info, relative_path=renamed[info.relative_path])
                           for idx, info in md.storage_data.items()}
        if merged is None:
            merged = md
            continue
        for key, value in md.state_dict_metadata.items():
            old = merged.state_dict_metadata.get(key)
            if old is not None and hasattr(old, "chunks"):
                old.chunks.extend(value.chunks)
            else:
                merged.state_dict_metadata[key] = value
        merged.storage_data.update(md.storage_data)
        for field in ("planner_data", "mcore_data"):
            extra = getattr(md, field, None)
            if isinstance(extra, dict) and isinstance(getattr(merged, field, None), dict):
                getattr(merged, field).update(extra)
    for name in ("metadata.json", "common.pt"):  # mcore 0.19 keeps the common state inside DCP ("common_state")
        if (parts[-1] / name).exists():
            os.replace(parts[-1] / name, dest / name)
    if merged.storage_meta is not None:
        merged.storage_meta.load_id = None
    with open(dest / DCP_METADATA, "wb") as f:
        pickle.dump(merged, f)
        f.flush()
        os.fsync(f.fileno())


class CheckpointReader(FileSystemReader):
    """A FileSystemReader that unpickles `.metadata` once, however many region loads it serves."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        if getattr(self, "_metadata", None) is None:
            safe_unpickle.check(Path(self.path) / DCP_METADATA)  # no code runs from a planted index
            self._metadata = super().read_metadata(*args, **kwargs)
        return self._metadata


class _RegionPlanner(LoadPlanner):
    """Loads requested regions of checkpoint tensors into caller-owned buffers."""

    def __init__(self, regions):
        self.regions = regions  # [(fqn, offsets, buffer shaped like the region)]

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        items: list[ReadItem] = []
        self.buffers = {}
        for fqn, offsets, buf in self.regions:
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=buf.shape)
            self.buffers[(fqn, tuple(offsets))] = buf
            items += create_read_items_for_chunk_list(fqn, self.metadata.state_dict_metadata[fqn], [chunk])
        return LoadPlan(items)

    def create_global_plan(self, global_plan):
        return global_plan

    def finish_plan(self, central_plan):
        return central_plan

    def load_bytes(self, read_item, value) -> None:
        raise ValueError(f"unexpected non-tensor item {read_item.dest_index.fqn!r}")

    def resolve_tensor(self, read_item: ReadItem):
        buf = self.buffers[(read_item.dest_index.fqn, tuple(read_item.dest_index.offset))]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            buf = buf.narrow(dim, start, length)
        return buf

    def commit_tensor(self, read_item, tensor) -> None:
        pass


def load_regions(reader: CheckpointReader, regions) -> None:
    """Fill each `(fqn, global offsets, buffer)` with that region of the checkpoint `reader` reads (one process)."""
    if regions:
        dcp_load({}, storage_reader=reader, planner=_RegionPlanner(regions), no_dist=True)


__all__ = ["CheckpointReader", "merge_parts", "load_regions"]
