"""Training checkpoints on megatron-core distributed checkpointing, so any TP/PP/EP layout saves and loads.

Megatron-LM layout (`iter_0000100/`, `latest_checkpointed_iteration.txt`), published atomically by rank 0."""
from __future__ import annotations

import base64
import json
import logging
import os
import random
import re
import secrets
import shutil
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from torch.distributed.checkpoint.api import CheckpointException

from megatron_dsv3.checkpoint.durable import barrier as _barrier
from megatron_dsv3.checkpoint.durable import broadcast as _broadcast
from megatron_dsv3.checkpoint.durable import fsync_dir as _fsync_dir
from megatron_dsv3.checkpoint.durable import fsync_tree as _fsync_tree
from megatron_dsv3.checkpoint.durable import rank as _rank
from megatron_dsv3.checkpoint.durable import world as _world
from megatron_dsv3.checkpoint.errors import FORMAT, LATEST, META, TRAIN_STATE, CheckpointError
from megatron_dsv3.checkpoint.errors import brief as _brief
from megatron_dsv3.checkpoint.errors import fail as _fail
from megatron_dsv3.checkpoint.errors import read_json as _read_json
from megatron_dsv3.checkpoint.folders import iteration_dir, resolve_latest
from megatron_dsv3.checkpoint.integrity import IntegrityError, verify_manifest, write_manifest
from megatron_dsv3.checkpoint.verify import check_model_matches, refuse_foreign_files
from megatron_dsv3.compat import in_process_write_results, load_checkpoint_objects_without_code

log = logging.getLogger(__name__)


def _unwrap(module):
    """The model under DDP/Float16 wrappers: its keys match what `load_state_dict` expects."""
    while hasattr(module, "module"):
        module = module.module
    return module


def _model_key(i: int, n: int) -> str:
    return "model" if n == 1 else f"model{i}"


def _sharded_state(model_chunks, optimizer, is_loading: bool) -> dict:
    """Model chunks (and optimizer state) as megatron-core ShardedTensors, keyed like Megatron-LM.

    Checkpoint keys are global layer names, so the file does not depend on the layout or the schedule."""
    state = {}
    for i, chunk in enumerate(model_chunks):
        state[_model_key(i, len(model_chunks))] = _unwrap(chunk).sharded_state_dict()
    if optimizer is not None:
        # Two chunks may hold copies with one checkpoint key (a tied embedding, a mirror stage): keep both
        # entries so every optimizer parameter finds its sharded tensor.
        merged = {f"{i}/{k}": v for i in range(len(model_chunks))
                  for k, v in state[_model_key(i, len(model_chunks))].items()}
        state["optimizer"] = optimizer.sharded_state_dict(merged, is_loading=is_loading)
    return state


def _rng_file(rank: int) -> str:
    return f"rng_rank{rank}.json"


def _bytes_of(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _tensor_of(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def _rng_state() -> dict:
    """This rank's random streams (python, numpy, torch CPU and CUDA, megatron-core's tracker) as JSON values:
    a checkpoint holds no pickle of ours, so loading one runs no code from it."""
    version, keys, gauss = random.getstate()
    kind, np_keys, pos, has_gauss, cached = np.random.get_state()
    state = {"random": [version, list(keys), gauss], "numpy": [kind, np_keys.tolist(), pos, has_gauss, cached],
             "torch": _bytes_of(torch.get_rng_state()),
             "tracker": {name: _bytes_of(t) for name, t in tensor_parallel.get_cuda_rng_tracker().get_states().items()}}
    if torch.cuda.is_available():
        state["cuda"] = _bytes_of(torch.cuda.get_rng_state())
    return state


def _set_rng_state(state: dict) -> None:
    version, keys, gauss = state["random"]
    random.setstate((version, tuple(keys), gauss))
    kind, np_keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(np_keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_tensor_of(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_tensor_of(state["cuda"]))
    tensor_parallel.get_cuda_rng_tracker().set_states({k: _tensor_of(v) for k, v in state["tracker"].items()})


def _write_text(path: Path, text: str) -> None:
    """Replace `path` atomically: write a temp file, fsync it, os.replace."""
    tmp = path.with_name(path.name + f".tmp-{secrets.token_hex(4)}")
    tmp.write_text(text)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _rename(src: Path, dst: Path) -> None:
    """One directory rename (a seam so tests can simulate a crash at publish time)."""
    os.rename(src, dst)


def _publish(tmp: Path, final: Path, save_dir: Path, iteration: int) -> None:
    """Rank 0: swap the finished temp dir into place, then point `latest` at it."""
    aside = None
    if final.exists():
        aside = final.with_name(f"{final.name}.old-{secrets.token_hex(4)}")
        _rename(final, aside)
    try:
        _rename(tmp, final)
    except BaseException:
        if aside is not None:
            os.rename(aside, final)  # put the previous copy back before reporting the failure
        raise
    _fsync_dir(save_dir)
    _write_text(save_dir / LATEST, f"{iteration}\n")
    _fsync_dir(save_dir)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _write_shards(tmp: Path, model_chunks, optimizer, scheduler, iteration: int, train_state: dict, rank: int,
                  world: int) -> None:
    """Every rank writes its shards and RNG state into `tmp`; rank 0 adds the metadata and integrity record."""
    state = _sharded_state(model_chunks, optimizer, is_loading=False)
    state["iteration"] = iteration
    state["checkpoint_format"] = FORMAT
    if scheduler is not None:
        state["opt_param_scheduler"] = scheduler.state_dict()
    with in_process_write_results():
        dist_checkpointing.save(state, str(tmp))

    _write_text(tmp / _rng_file(rank), json.dumps(_rng_state()))
    _barrier()  # every rank's RNG file is written before rank 0 records the hashes
    if rank == 0:  # then hash every top-level file, ours included, for the load-time integrity check
        meta = json.loads((tmp / META).read_text())
        meta.update(format=FORMAT, iteration=iteration, world_size=world,
                    tp=parallel_state.get_tensor_model_parallel_world_size(),
                    pp=parallel_state.get_pipeline_model_parallel_world_size(),
                    ep=parallel_state.get_expert_model_parallel_world_size(),
                    has_optimizer=optimizer is not None, has_scheduler=scheduler is not None)
        _write_text(tmp / META, json.dumps(meta, indent=1, sort_keys=True))
        _write_text(tmp / TRAIN_STATE, json.dumps(train_state, indent=1, sort_keys=True))
        write_manifest(tmp)
    _barrier()
    _fsync_tree(tmp)  # every rank, so shards written on other nodes are durable too
    _barrier()


def _root_cause(exc: BaseException) -> BaseException:
    """The OSError under megatron-core's `RuntimeError: Worker failure ...` wrappers, if there is one."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    match = re.search(r"(\[Errno \d+\][^'\\]*)", str(exc))
    return OSError(match.group(1)) if match else exc


def _raise_on_any_rank(error: Optional[str], save_dir: Path, tmp: Path) -> None:
    """If any rank failed to write, all raise one CheckpointError naming the folder and the cause, after rank 0
    removed the partial write; the previous checkpoint and `latest` are untouched."""
    errors = [error] if _world() == 1 else [None] * _world()
    if _world() > 1:
        dist.all_gather_object(errors, error)
    first = next((e for e in errors if e is not None), None)
    if first is None:
        return
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    raise CheckpointError(f"--save: {save_dir}: writing iteration {tmp.name.split('.tmp-')[0]} failed ({first}); "
                          f"the previous checkpoint and {LATEST} are unchanged")


def remove_leftovers(save_dir: Path) -> None:
    """Folders of interrupted writes (`iter_N.tmp-*`), and copies set aside by an interrupted overwrite
    (`iter_N.old-*`) once `iter_N` is complete again; a complete checkpoint is never touched."""
    if not save_dir.is_dir():
        return
    for tmp in save_dir.glob("iter_*.tmp-*"):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
    for aside in save_dir.glob("iter_*.old-*"):
        complete = save_dir / aside.name.split(".old-")[0] / "integrity.json"
        if aside.is_dir() and complete.is_file():
            shutil.rmtree(aside, ignore_errors=True)


def save_checkpoint(save_dir, iteration: int, model_chunks: Sequence, optimizer=None, scheduler=None,
                    train_state: Optional[dict] = None) -> str:
    """Save model, optimizer, scheduler, train_state and per-rank RNG; return the iteration dir.

    All ranks write `iter_N.tmp-<nonce>`; rank 0 renames it in, so a crash keeps the previous `latest`."""
    if not isinstance(iteration, int) or iteration < 0:
        raise ValueError(f"iteration: expected a non-negative int, got {iteration!r}")
    model_chunks = list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    save_dir = Path(save_dir).absolute()
    train_state = dict(train_state or {})
    train_state.setdefault("iteration", iteration)
    json.dumps(train_state)  # fail before writing anything if it is not JSON-able
    rank, world = _rank(), _world()
    nonce = _broadcast(secrets.token_hex(6) if rank == 0 else None)
    final = iteration_dir(save_dir, iteration)
    tmp = final.with_name(f"{final.name}.tmp-{nonce}")
    error = None
    if rank == 0:
        try:
            remove_leftovers(save_dir)
            tmp.mkdir(parents=True)
        except OSError as exc:
            error = _brief(exc)
    _raise_on_any_rank(error, save_dir, tmp)
    try:
        _write_shards(tmp, model_chunks, optimizer, scheduler, iteration, train_state, rank, world)
        error = None
    except (Exception, CheckpointException) as exc:  # a full disk, a read-only or vanished folder, ...
        error = _brief(_root_cause(exc))
    _raise_on_any_rank(error, save_dir, tmp)

    error = None
    if rank == 0:
        try:
            _publish(tmp, final, save_dir, iteration)
        except Exception as exc:  # reported on every rank so none waits forever
            error = _brief(exc)
    error = _broadcast(error)
    if error is not None:
        raise CheckpointError(f"--save: {save_dir}: publishing {tmp.name} as {final.name} failed ({error}); "
                              f"{LATEST} is unchanged")
    return str(final)


def check_writable(save_dir) -> None:
    """Before training: `save_dir` can be created and written (so a bad --save fails now, not at the first
    save); raises CheckpointError naming it."""
    save_dir = Path(save_dir).absolute()
    try:
        save_dir.mkdir(parents=True, exist_ok=True)
        probe = save_dir / f".write-test-{secrets.token_hex(4)}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise CheckpointError(f"--save: {save_dir}: not a writable directory ({_brief(exc)})") from None


def peek_train_state(load_dir) -> dict:
    """The train_state.json of the `latest` checkpoint under `load_dir`, read before anything is loaded."""
    _, path = resolve_latest(Path(load_dir).absolute())
    return _read_json(path / TRAIN_STATE)


def load_checkpoint(load_dir, model_chunks: Sequence, optimizer=None, scheduler=None, *,
                    load_rng: bool = True, partial: bool = False) -> dict:
    """Load the `latest` checkpoint into model (strict), optimizer, scheduler and RNG; return train_state.

    Files are checked (existence, JSON, SHA-256, no foreign or pickled files, the model's tensor names and
    shapes) before anything is changed; problems raise CheckpointError. `partial` skips the shape check."""
    load_checkpoint_objects_without_code()
    model_chunks = list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    iteration, path = resolve_latest(Path(load_dir).absolute())
    if _rank() == 0:
        remove_leftovers(Path(load_dir).absolute())
    try:
        verify_manifest(path)
    except IntegrityError as exc:
        _fail(path, f"corrupt or incomplete ({_brief(exc)})")
    meta = _read_json(path / META)
    train_state = _read_json(path / TRAIN_STATE)
    if optimizer is not None and not meta.get("has_optimizer", True):
        _fail(path, "was saved without optimizer state")
    if scheduler is not None and not meta.get("has_scheduler", True):
        _fail(path, "was saved without scheduler state")
    refuse_foreign_files(path)
    rng = None
    if load_rng and meta.get("world_size") == _world():
        rng = _read_json(path / _rng_file(_rank()))
    elif load_rng:
        log.warning("--load: %s was saved with world size %s, now %s: RNG states are not restored",
                    path, meta.get("world_size"), _world())

    state = _sharded_state(model_chunks, optimizer, is_loading=True)
    if not partial:
        check_model_matches(path, [state[_model_key(i, len(model_chunks))] for i in range(len(model_chunks))])
    if scheduler is not None:
        state["opt_param_scheduler"] = {}
    try:
        loaded = dist_checkpointing.load(state, str(path))
    except (Exception, CheckpointException) as exc:  # torch DCP's CheckpointException is a BaseException
        _fail(path, f"corrupt or incompatible shards ({_brief(exc)})")

    for i, chunk in enumerate(model_chunks):
        _unwrap(chunk).load_state_dict(loaded[_model_key(i, len(model_chunks))], strict=not partial)
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None:
        scheduler.num_steps = 0  # megatron-core's load_state_dict adds the saved count to the current one
        try:
            scheduler.load_state_dict(loaded["opt_param_scheduler"])
        except AssertionError as exc:  # megatron-core's check that flags and checkpoint agree
            _fail(path, f"{exc}; pass --override-opt_param-scheduler to follow the flags or "
                        "--use-checkpoint-opt_param-scheduler to keep the checkpoint's schedule")
    if rng is not None:
        _set_rng_state(rng)
    train_state.setdefault("iteration", iteration)
    return train_state
