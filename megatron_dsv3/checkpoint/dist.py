"""Training checkpoints on megatron-core distributed checkpointing, so any TP/PP/EP layout saves and loads.

Megatron-LM layout (`iter_0000100/`, `latest_checkpointed_iteration.txt`), published atomically by rank 0."""
from __future__ import annotations

import json
import logging
import os
import random
import secrets
import shutil
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.validation import save_integrity_manifest, verify_integrity_manifest

LATEST = "latest_checkpointed_iteration.txt"
TRAIN_STATE = "train_state.json"
META = "metadata.json"  # megatron-core's own file; it ignores the extra keys we add
FORMAT = "megatron_dsv3.dist/1"
log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message starts with `--load: ` and names the path."""


def iteration_dir(root, iteration: int) -> Path:
    """`root/iter_0000100`, Megatron-LM's naming."""
    return Path(root) / f"iter_{iteration:07d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    return dist.barrier() if dist.is_initialized() else None


def _broadcast(obj):
    """Rank 0's value of `obj` on every rank (so all ranks agree on names and outcomes)."""
    if not dist.is_initialized() or _world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


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


def _rng_state() -> dict:
    """This rank's random streams: python, numpy, torch CPU (and CUDA), megatron-core's tracker."""
    state = {"random": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _fsync_tree(path: Path) -> None:
    """Flush every file and directory under `path` (and `path` itself) to stable storage."""
    for root, dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(root))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    if rank == 0:
        tmp.mkdir(parents=True)
    _barrier()

    state = _sharded_state(model_chunks, optimizer, is_loading=False)
    state["iteration"] = iteration
    state["checkpoint_format"] = FORMAT
    if scheduler is not None:
        state["opt_param_scheduler"] = scheduler.state_dict()
    dist_checkpointing.save(state, str(tmp))

    (tmp / "rng").mkdir(exist_ok=True)
    torch.save(_rng_state(), tmp / "rng" / f"rank{rank}.pt")
    if rank == 0:  # then hash every top-level file, ours included, for the load-time integrity check
        meta = json.loads((tmp / META).read_text())
        meta.update(format=FORMAT, iteration=iteration, world_size=world,
                    tp=parallel_state.get_tensor_model_parallel_world_size(),
                    pp=parallel_state.get_pipeline_model_parallel_world_size(),
                    ep=parallel_state.get_expert_model_parallel_world_size(),
                    has_optimizer=optimizer is not None, has_scheduler=scheduler is not None)
        _write_text(tmp / META, json.dumps(meta, indent=1, sort_keys=True))
        _write_text(tmp / TRAIN_STATE, json.dumps(train_state, indent=1, sort_keys=True))
        save_integrity_manifest(str(tmp))
    _barrier()
    _fsync_tree(tmp)  # every rank, so shards written on other nodes are durable too
    _barrier()

    error = None
    if rank == 0:
        try:
            _publish(tmp, final, save_dir, iteration)
        except Exception as exc:  # reported on every rank so none waits forever
            error = _brief(exc)
    error = _broadcast(error)
    if error is not None:
        raise RuntimeError(f"save_checkpoint: publishing {tmp} as {final} failed ({error}); "
                           f"{save_dir / LATEST} is unchanged")
    return str(final)


def _fail(path, problem: str):
    error = CheckpointError(f"--load: {path}: {problem}")
    error.__suppress_context__ = True  # one line for the user, not the chained library traceback
    raise error


def _brief(exc: BaseException) -> str:
    """An exception as one short line (torch and megatron-core errors can span many)."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:240]}"


def _resolve(load_dir: Path) -> tuple[int, Path]:
    """Read `latest` and find its iteration dir (or a copy set aside by an interrupted overwrite)."""
    if not load_dir.is_dir():
        _fail(load_dir, "checkpoint directory does not exist")
    latest = load_dir / LATEST
    if not latest.is_file():
        _fail(latest, "missing; no complete checkpoint was ever published here")
    text = latest.read_text(errors="replace").strip()
    if not text.isdigit():
        _fail(latest, f"garbled: expected an iteration number, found {text[:40]!r}")
    iteration = int(text)
    path = iteration_dir(load_dir, iteration)
    if not path.is_dir():
        aside = sorted(load_dir.glob(f"{path.name}.old-*"))
        if not aside:
            _fail(path, f"missing, but {latest} names iteration {iteration}")
        log.warning("%s is missing; using %s left by an interrupted save", path, aside[-1])
        path = aside[-1]
    return iteration, path


def _read_json(path: Path) -> dict:
    if not path.is_file():
        _fail(path, "missing (incomplete checkpoint)")
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        _fail(path, f"corrupt JSON ({exc})")


def load_checkpoint(load_dir, model_chunks: Sequence, optimizer=None, scheduler=None, *,
                    load_rng: bool = True) -> dict:
    """Load the `latest` checkpoint into model (strict), optimizer, scheduler and RNG; return train_state.

    Files are checked (existence, JSON, SHA-256) before anything is changed; problems raise CheckpointError."""
    model_chunks = list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    iteration, path = _resolve(Path(load_dir).absolute())
    try:
        verify_integrity_manifest(str(path))
    except Exception as exc:
        _fail(path, f"corrupt or incomplete ({_brief(exc)})")
    meta = _read_json(path / META)
    train_state = _read_json(path / TRAIN_STATE)
    if optimizer is not None and not meta.get("has_optimizer", True):
        _fail(path, "was saved without optimizer state")
    if scheduler is not None and not meta.get("has_scheduler", True):
        _fail(path, "was saved without scheduler state")
    rng = None
    if load_rng and meta.get("world_size") == _world():
        rng_file = path / "rng" / f"rank{_rank()}.pt"
        if not rng_file.is_file():
            _fail(rng_file, "missing (incomplete checkpoint)")
        try:
            rng = torch.load(rng_file, weights_only=False)
        except Exception as exc:  # torch reports truncation as several different errors
            _fail(rng_file, f"corrupt RNG state ({_brief(exc)})")
    elif load_rng:
        log.warning("--load: %s was saved with world size %s, now %s: RNG states are not restored",
                    path, meta.get("world_size"), _world())

    state = _sharded_state(model_chunks, optimizer, is_loading=True)
    if scheduler is not None:
        state["opt_param_scheduler"] = {}
    try:
        loaded = dist_checkpointing.load(state, str(path))
    except Exception as exc:  # unreadable shards, tensors absent from the checkpoint, shape mismatch
        _fail(path, f"corrupt or incompatible shards ({_brief(exc)})")

    for i, chunk in enumerate(model_chunks):
        _unwrap(chunk).load_state_dict(loaded[_model_key(i, len(model_chunks))], strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None:
        scheduler.num_steps = 0  # megatron-core's load_state_dict adds the saved count to the current one
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if rng is not None:
        _set_rng_state(rng)
    train_state.setdefault("iteration", iteration)
    return train_state
