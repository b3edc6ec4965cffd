"""Streaming access to megatron-core `torch_dist` checkpoints, one bounded group of tensors at a time.

A `torch_dist` checkpoint is a PyTorch DCP checkpoint whose keys are megatron-core's sharded keys: tensors
as chunks of their global tensors, objects as `torch.save([data])` bytes under `key/shard_<offset>_<shape>`,
the common state as the object `common_state`, plus megatron-core's `metadata.json`. The converter writes
it here with PyTorch DCP alone, in parts (one per Hugging Face shard and rank), and merges them: the parts'
data files are moved into one folder and their `.metadata` united (chunks of one tensor may come from
several parts; DCP reassembles and reshards them on load). Reading uses a DCP load planner that asks for
arbitrary regions (one expert of a stacked expert tensor, say), so only those bytes are read.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pickle
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.default_planner import create_default_global_save_plan
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, Metadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import (LoadPlan, LoadPlanner, ReadItem, SavePlan, SavePlanner,
                                                  TensorWriteData, WriteItem, WriteItemType)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from megatron_dsv3.checkpoint import safe_unpickle

DCP_METADATA = ".metadata"
MCORE_CONFIG = "metadata.json"
MCORE_BACKEND = {"sharded_backend": "torch_dist", "sharded_backend_version": 1}  # megatron-core's save_config
COMMON_STATE = "common_state/shard_0_1"  # megatron-core's ShardedObject("common_state", (1,), (0,)).unique_key


class _ChunkSavePlanner(SavePlanner):
    """Writes given tensors as chunks of their global tensors, and given objects as megatron-core does."""

    def __init__(self, chunks, objects: Mapping[str, Any]):
        self.data, self.items = {}, []
        for key, global_shape, offsets, tensor in chunks:
            index = MetadataIndex(key, torch.Size(offsets))
            self.data[index] = tensor
            self.items.append(WriteItem(index=index, type=WriteItemType.SHARD, tensor_data=TensorWriteData(
                chunk=ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=tensor.shape),
                properties=TensorProperties.create_from_tensor(tensor), size=torch.Size(global_shape))))
        for key, obj in objects.items():
            buffer = io.BytesIO()
            torch.save([obj], buffer)  # megatron-core stores a list of the object's shards' data
            self.data[MetadataIndex(key)] = buffer
            self.items.append(WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO))

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator=False) -> None:
        self.storage_meta = storage_meta

    def create_local_plan(self) -> SavePlan:
        return SavePlan(self.items)

    def create_global_plan(self, all_plans):
        plans, metadata = create_default_global_save_plan(all_plans)
        return plans, dataclasses.replace(metadata, storage_meta=self.storage_meta)

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        return new_plan

    def resolve_data(self, write_item: WriteItem):
        return self.data[write_item.index]


class _HashingStream(io.RawIOBase):
    """A binary file being written front to back, hashed (SHA-256) on the way.

    Large buffers go in 256 KiB pieces, each written and then hashed while the copy into the page cache has
    left it in the CPU cache: SHA-256 over memory not in cache ran at 1.2 GB/s here, over cached data at 1.8,
    so a 256 MB tensor took 0.20 s to write and hash instead of 0.26."""

    PIECE = 1 << 18

    def __init__(self, raw):
        self.raw, self.hash = raw, hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        data = memoryview(b).cast("B")
        start = 0
        while start < len(data):
            piece = data[start:start + self.PIECE]
            written = self.raw.write(piece)  # both calls release the GIL
            self.hash.update(piece[:written])
            start += written
        return len(data)

    def tell(self) -> int:
        return self.raw.tell()

    def flush(self) -> None:
        self.raw.flush()

    def fileno(self) -> int:
        return self.raw.fileno()


@contextmanager
def _torch_save_without_crc32():
    """torch.save in this thread (the setting is per thread) skips each zip record's CRC32, a pass over the
    data at ~1.7 GB/s that torch.load never checks: the SHA-256 of the whole file replaces it."""
    before = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(before)


class _HashingFileSystem(FileSystem):
    """DCP's local file system, keeping the SHA-256 of each file it writes (integrity.json needs no re-read)
    in place of the CRC32 that torch.save would give each record."""

    def __init__(self):
        super().__init__()
        self.digests: dict[Path, str] = {}

    @contextmanager
    def create_stream(self, path, mode: str):
        with super().create_stream(path, mode) as raw:
            if "w" not in mode:
                yield raw
                return
            stream = _HashingStream(raw)
            with _torch_save_without_crc32():  # DCP's writer threads torch.save each item into this stream
                yield stream
        self.digests[Path(path)] = stream.hash.hexdigest()  # only once the file is complete and closed


def write_part(part: Path, chunks: Sequence[tuple[str, tuple, tuple, torch.Tensor]],
               objects: Optional[Mapping[str, Any]] = None) -> dict[Path, str]:
    """Write one DCP checkpoint in this process alone: each `(key, global shape, offsets, tensor)` as a chunk,
    each object under its unique key. Returns the SHA-256 of each data file written (not yet fsync-ed)."""
    writer = FileSystemWriter(str(part), single_file_per_rank=True, sync_files=False, thread_count=2)
    writer.fs = _HashingFileSystem()
    dcp_save({}, storage_writer=writer, planner=_ChunkSavePlanner(chunks, objects or {}), no_dist=True)
    return {p: digest for p, digest in writer.fs.digests.items() if p.suffix == ".distcp"}


def write_mcore_config(folder: Path, **extra) -> None:
    """megatron-core's `metadata.json` (which backend wrote the shards), with this project's fields added."""
    (folder / MCORE_CONFIG).write_text(json.dumps({**MCORE_BACKEND, **extra}, indent=1, sort_keys=True))


def merge_parts(parts: Sequence[Path], dest: Path) -> dict[Path, Path]:
    """Move the data files of DCP checkpoints `parts` into `dest` and write their united `.metadata`.

    Returns where each data file went. An object key written by several parts keeps the last one.
    """
    merged: Metadata | None = None
    moved: dict[Path, Path] = {}
    dest.mkdir(parents=True, exist_ok=True)
    for i, part in enumerate(parts):
        md = FileSystemReader(str(part)).read_metadata()
        renamed = {}
        for name in sorted(os.listdir(part)):
            if name.endswith(".distcp"):
                renamed[name] = f"p{i:05d}{name}"
                os.replace(part / name, dest / renamed[name])
                moved[part / name] = dest / renamed[name]
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
    if merged.storage_meta is not None:  # the parts' ids (a Path object among them) mean nothing once merged
        merged.storage_meta = dataclasses.replace(merged.storage_meta, checkpoint_id=None, load_id=None)
    with open(dest / DCP_METADATA, "wb") as f:
        pickle.dump(merged, f)
    return moved


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


__all__ = ["CheckpointReader", "load_regions", "merge_parts", "write_mcore_config", "write_part"]
