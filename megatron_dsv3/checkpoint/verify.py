"""Load-time checks of a checkpoint folder, before anything is read into the model: only the format's own files
(all covered by the integrity record, the pickled index checked class by class), and exactly the requested
model's tensors."""
from __future__ import annotations

import re
from pathlib import Path

import torch.distributed as dist
from megatron.core import dist_checkpointing
from torch.distributed.checkpoint.api import CheckpointException

from megatron_dsv3.checkpoint import safe_unpickle
from megatron_dsv3.checkpoint.errors import META, TRAIN_STATE, brief, fail, read_json


# What megatron-core writes into an iteration directory, besides our JSON files; anything else (a planted file,
# the pickled RNG of checkpoints before megatron_dsv3 0.2) is refused before anything is read.
_MCORE_FILES = re.compile(r"(\.metadata|integrity\.json|metadata\.json|[\w-]+\.distcp)$")


def refuse_foreign_files(path: Path) -> None:
    """Every file must be one the checkpoint format names and the integrity record covers; `.metadata` is
    a pickle, so its classes are checked against torch DCP's and megatron-core's before torch unpickles it."""
    recorded = set(read_json(path / "integrity.json").get("files", {}))
    for entry in sorted(path.iterdir()):
        ours = entry.name in (META, TRAIN_STATE, "hf_config.json") or re.fullmatch(r"rng_rank\d+\.json", entry.name)
        if entry.is_dir() or not (ours or _MCORE_FILES.fullmatch(entry.name)):
            fail(entry, "not a file of this checkpoint format (a checkpoint from an older megatron_dsv3 keeps "
                        "its RNG as a pickle: load it with --no-load-rng after removing rng/)")
        if entry.name != "integrity.json" and entry.name not in recorded:
            fail(entry, "not covered by the checkpoint's integrity record")
    try:
        safe_unpickle.check(path / ".metadata")
    except safe_unpickle.UnsafePickle as exc:
        fail(path / ".metadata", str(exc))


def check_model_matches(path: Path, model_states: list) -> None:
    """The checkpoint holds exactly the requested model's tensors, with the same global shapes: the first
    tensor that is missing, extra or of another shape is named with both shapes."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    def tensors(entries):  # a factory (e.g. a gated fc1 kept as two halves) builds the tensors it stores
        for entry in entries:
            if isinstance(entry, ShardedTensorFactory):
                yield from tensors(nested_values(entry.build()))
            elif isinstance(entry, ShardedTensor):
                yield entry

    try:
        saved = dist_checkpointing.load_tensors_metadata(str(path))
    except (Exception, CheckpointException) as exc:
        fail(path, f"unreadable tensor index ({brief(exc)})")
    saved = {k: tuple(v.global_shape) for k, v in saved.items() if not re.match(r"(chained_\d+\.)?optimizer\.", k)}
    wanted = {t.key: tuple(t.global_shape) for st in model_states for t in tensors(nested_values(st))}
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world > 1:  # each rank holds its pipeline stage (and experts): the model is the union over ranks
        parts = [None] * world
        dist.all_gather_object(parts, wanted)
        wanted = {k: v for part in parts for k, v in part.items()}
    for key in sorted(wanted.keys() | saved.keys()):
        if wanted.get(key) != saved.get(key):
            have, want = saved.get(key, "absent"), wanted.get(key, "absent")
            fail(path, f"does not match the requested model: tensor {key} is {have} in the checkpoint and {want} "
                       "in the model (check --preset and the shape flags; --dist-ckpt-strictness ignore_all "
                       "loads what matches)")
