"""`dsv3-convert`: Hugging Face DeepSeek-V3 safetensors <-> megatron-core distributed checkpoints, streamed.

    dsv3-convert hf-to-mcore --input HF_DIR --output CKPT_DIR [--expert-model-parallel-size 2 ...]
    dsv3-convert mcore-to-hf --input CKPT_DIR --output HF_DIR [--fp8]

Each Hugging Face tensor is one chunk of one megatron-core checkpoint tensor (see `mapping`), so tensors are
read, converted and written one shard at a time; the checkpoint is layout-independent (megatron-core reshards
on load), loadable by any TP/PP/EP layout. It is written with PyTorch DCP directly (`dcp_io`), so the
converter never imports megatron-core. Everything is written under a temporary folder that is renamed into
place at the end; problems raise one `ConversionError` naming the tensor or path, before anything is written.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megatron_dsv3.checkpoint import dcp_io
from megatron_dsv3.checkpoint.durable import barrier as _barrier
from megatron_dsv3.checkpoint.durable import broadcast as _broadcast
from megatron_dsv3.checkpoint.durable import fsync_tree
from megatron_dsv3.checkpoint.durable import rank as _rank
from megatron_dsv3.checkpoint.durable import world as _world
from megatron_dsv3.checkpoint.errors import FORMAT, LATEST, TRAIN_STATE, CheckpointError, all_finite
from megatron_dsv3.checkpoint.folders import iteration_dir, resolve_latest
from megatron_dsv3.checkpoint.integrity import IntegrityError, ManifestWriter, verify_manifest
from megatron_dsv3.checkpoint.mapping import checkpoint_layout, mtp_duplicates, quantized_in_fp8, rope_order

FP8_BLOCK = (128, 128)
HF_CONFIG = "hf_config.json"  # the source config.json, kept inside the iteration folder for the way back
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ST_FP8 = "F8_E4M3"


class ConversionError(ValueError):
    """A conversion that cannot proceed; the message is one line naming the tensor or path."""


def _fail(message: str):
    error = ConversionError(message)
    error.__suppress_context__ = True
    raise error


# ---------------------------------------------------------------- Hugging Face side


class HFIndex:
    """Tensor names, shapes and dtypes of a safetensors checkpoint (index json or one model.safetensors)."""

    def __init__(self, root: Path):
        from safetensors import safe_open

        self.root = root
        index = root / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, UnicodeDecodeError) as exc:
                _fail(f"{index}: not a safetensors index ({type(exc).__name__}: {exc})")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                _fail(f"{index}: weight_map must map tensor names to shard file names")
            files = sorted(set(weight_map.values()))
            outside = next((f for f in files if not (root / f).resolve().is_relative_to(root.resolve())), None)
            if outside is not None:
                _fail(f"{index}: weight_map names {outside!r}, outside --input {root}")
        elif (root / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            _fail(f"{root}: no model.safetensors.index.json or model.safetensors")
        self.file_of, self.shape, self.dtype = {}, {}, {}
        self.files = []
        for name in files:
            path = root / name
            if not path.is_file():
                _fail(f"{path}: shard named in the index is missing")
            try:
                with safe_open(str(path), "pt") as f:
                    for key in f.keys():
                        sl = f.get_slice(key)
                        self.file_of[key], self.shape[key], self.dtype[key] = path, tuple(sl.get_shape()), sl.get_dtype()
            except Exception as exc:  # a truncated or foreign file
                _fail(f"{path}: unreadable safetensors file ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})")
            self.files.append(path)

    def read(self, handles: dict, name: str) -> torch.Tensor:
        from safetensors import safe_open

        path = self.file_of[name]
        if path not in handles:
            handles[path] = safe_open(str(path), "pt")
        return handles[path].get_tensor(name)


def _fp8_scale_shape(shape) -> tuple[int, int]:
    return (math.ceil(shape[0] / FP8_BLOCK[0]), math.ceil(shape[1] / FP8_BLOCK[1]))


def _check_hf(src: HFIndex, pieces, cfg) -> None:
    """Every expected tensor present with its shape, nothing unexpected; else one error naming the tensor."""
    expected = {p.hf_name: p for p in pieces}
    dups = mtp_duplicates(cfg)
    where = f"Hugging Face checkpoint {src.root}"
    for p in pieces:
        if p.hf_name not in src.shape:
            _fail(f"{where}: missing tensor {p.hf_name!r}")
    for name in sorted(src.shape, key=lambda n: (str(src.file_of[n]), n)):
        shape, dtype = src.shape[name], src.dtype[name]
        if name in expected:
            if shape != expected[name].shape:
                _fail(f"{where}: tensor {name!r} has shape {shape}, expected {expected[name].shape}")
            if dtype == _ST_FP8:
                scale = name + "_scale_inv"
                if len(shape) != 2 or scale not in src.shape:
                    _fail(f"{where}: FP8 tensor {name!r} has no {scale!r}")
                if src.shape[scale] != _fp8_scale_shape(shape):
                    _fail(f"{where}: tensor {scale!r} has shape {src.shape[scale]}, "
                          f"expected {_fp8_scale_shape(shape)} for 128x128 blocks")
        elif name.endswith("_scale_inv") and src.dtype.get(name[: -len("_scale_inv")]) == _ST_FP8:
            continue
        elif name in dups:
            continue
        else:
            _fail(f"{where}: unexpected tensor {name!r}")


def _convert_in(src: HFIndex, handles: dict, piece, dtype: Optional[torch.dtype], interleaved: bool) -> torch.Tensor:
    from megatron_dsv3.fp8 import dequantize_blockwise

    t = src.read(handles, piece.hf_name)
    if src.dtype[piece.hf_name] == _ST_FP8:
        scale = src.read(handles, piece.hf_name + "_scale_inv")
        t = dequantize_blockwise(t, scale, FP8_BLOCK, dtype=dtype or torch.bfloat16)
    elif dtype is not None:
        t = t.to(dtype)
    if piece.rope is not None and not interleaved:
        t = t[rope_order(*piece.rope, to_interleaved=True)]
    if not all_finite(t):
        _fail(f"{piece.hf_name}: holds NaN or Inf values; refusing to import them")
    return t


# ---------------------------------------------------------------- runtime helpers


def _check_output(out: Path) -> None:
    if out.is_symlink():
        _fail(f"--output: {out} is a symbolic link; give the real folder (it is created and renamed into place)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        _fail(f"--output: {out} already exists and is not empty")
    if not out.parent.is_dir():
        _fail(f"--output: parent folder {out.parent} does not exist")


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled or _rank() != 0, dynamic_ncols=True)


def _publish(tmp: Path, out: Path) -> None:
    fsync_tree(tmp)
    if out.exists():  # an empty folder given as output
        out.rmdir()
    os.rename(tmp, out)


def _join_launch() -> None:
    """Under torchrun, join the launch's process group (gloo: only names and flags travel) so ranks split the
    tensors; one process converts alone."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")


def _run_in_tmp(out: Path, work) -> None:
    """Run `work(tmp)` on all ranks with a shared temp folder; rank 0 publishes it or removes it."""
    nonce = _broadcast(secrets.token_hex(4) if _rank() == 0 else None)
    tmp = out.parent / f".{out.name}.tmp-{nonce}"
    error = None
    try:
        work(tmp)
    except BaseException as exc:
        error = exc
    failed = _any(error is not None) if _world() > 1 else error is not None
    if _rank() == 0:
        if failed:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            _publish(tmp, out)
    _barrier()
    if error is not None:
        raise error
    if failed:
        _fail(f"--output: conversion failed on another rank; {out} was not written")


def _any(flag: bool) -> bool:
    t = torch.tensor([int(flag)])
    dist.all_reduce(t)
    return bool(t.item())


# ---------------------------------------------------------------- HF -> megatron-core


def hf_to_mcore(input_dir, output_dir, *, tp: int = 1, pp: int = 1, ep: int = 1, backend: str = "local",
                dtype: Optional[str] = None, progress: bool = True) -> Path:
    """Convert a Hugging Face DeepSeek-V3 folder to a megatron-core checkpoint folder (`dsv3-pretrain --load`)."""
    from megatron_dsv3.checkpoint.hf import config_from_hf

    _join_launch()
    inp, out = Path(input_dir).absolute(), Path(output_dir).absolute()
    if not inp.is_dir():
        _fail(f"--input: {inp} is not a folder")
    if not (inp / "config.json").is_file():
        _fail(f"--input: {inp / 'config.json'} is missing")
    _check_output(out)
    if backend not in ("local", "te"):
        _fail(f"--backend: expected 'local' or 'te', got {backend!r}")
    if dtype is not None and dtype not in DTYPES:
        _fail(f"--dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    try:
        hf_config = json.loads((inp / "config.json").read_text())
        cfg = config_from_hf(hf_config)
        cfg.replace(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep)
    except (ValueError, TypeError) as exc:
        _fail(f"--input: {inp / 'config.json'}: {exc}")
    if cfg.n_routed_experts % ep:
        _fail(f"--expert-model-parallel-size: {ep} does not divide n_routed_experts={cfg.n_routed_experts}")
    interleaved = bool(hf_config.get("rope_interleave", True))
    src = HFIndex(inp)
    pieces, objects = checkpoint_layout(cfg)
    _check_hf(src, pieces, cfg)
    by_file = {f: [p for p in pieces if src.file_of[p.hf_name] == f] for f in src.files}
    rank, world, target = _rank(), _world(), DTYPES.get(dtype)

    def work(tmp: Path) -> None:
        parts = tmp / "parts"
        if rank == 0:
            parts.mkdir(parents=True)
        _barrier()
        hashes = ManifestWriter() if rank == 0 else None  # flushing its files while it converts the next shard
        bar = _progress(len(pieces), "hf-to-mcore", progress)
        for i, path in enumerate(src.files):
            chunks, handles = [], {}
            for piece in by_file[path][rank::world]:
                t = _convert_in(src, handles, piece, target, interleaved)
                chunks.append((piece.key, piece.global_shape, piece.offsets, t.reshape(piece.chunk_shape)))
                bar.update(world)
            files = dcp_io.write_part(parts / f"{i:05d}-{rank:05d}", chunks)
            for file, digest in files.items() if rank == 0 else ():  # other ranks' files: hashed at the end
                hashes.add(file, digest)
            del chunks, handles  # unmaps the shard
        bar.close()
        if rank == 0:  # the common state and the linears' (empty) extra states, as megatron-core saves them
            common = {"iteration": 0, "checkpoint_format": FORMAT}
            dcp_io.write_part(parts / "common", [], {dcp_io.COMMON_STATE: common, **dict.fromkeys(objects)})
        _barrier()
        if rank != 0:
            return
        it = iteration_dir(tmp, 0)
        for old, new in dcp_io.merge_parts(sorted(parts.iterdir()), it).items():
            hashes.moved(old, new)
        shutil.rmtree(parts)
        dcp_io.write_mcore_config(it, format=FORMAT, iteration=0, world_size=None, tp=tp, pp=pp, ep=ep,
                                  backend=backend, has_optimizer=False, has_scheduler=False, converted_from=str(inp))
        (it / TRAIN_STATE).write_text(json.dumps({"iteration": 0, "consumed_samples": 0}, indent=1))
        (it / HF_CONFIG).write_text(json.dumps(hf_config, indent=1))
        hashes.write(it)
        (tmp / LATEST).write_text("0\n")

    _run_in_tmp(out, work)
    return out


# ---------------------------------------------------------------- megatron-core -> HF


def _parse_size(text: str) -> int:
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    num = t.rstrip("KMGIB")
    try:
        value = int(float(num) * units[t[len(num):]])
    except (ValueError, KeyError):
        _fail(f"--max-shard-size: expected a size like 5GB or 400MB, got {text!r}")
    if value <= 0:
        _fail(f"--max-shard-size: must be positive, got {text!r}")
    return value


def mcore_to_hf(input_dir, output_dir, *, fp8: bool = False, max_shard_size="5GB", hf_config=None,
                progress: bool = True) -> Path:
    """Convert a megatron-core checkpoint folder (CKPT_DIR with `latest_checkpointed_iteration.txt`) to HF."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from megatron_dsv3.checkpoint.hf import config_from_hf
    from megatron_dsv3.fp8 import quantize_blockwise

    _join_launch()
    inp, out = Path(input_dir).absolute(), Path(output_dir).absolute()
    try:
        _, path = resolve_latest(inp)
        verify_manifest(path)
    except CheckpointError as exc:
        _fail(str(exc).replace("--load: ", "--input: ", 1))
    except IntegrityError as exc:
        _fail(f"--input: {path}: corrupt or incomplete ({exc})")
    _check_output(out)
    limit = _parse_size(str(max_shard_size))
    config_path = Path(hf_config) if hf_config else path / HF_CONFIG
    if not config_path.is_file():
        _fail(f"--hf-config: {config_path} is missing (checkpoints not made by hf-to-mcore need --hf-config)")
    try:
        hf_cfg = json.loads(config_path.read_text())
        cfg = config_from_hf(hf_cfg)
    except (ValueError, TypeError) as exc:
        _fail(f"--hf-config: {config_path}: {exc}")
    interleaved = bool(hf_cfg.get("rope_interleave", True))
    pieces, _ = checkpoint_layout(cfg)
    reader = dcp_io.CheckpointReader(str(path))
    md = reader.read_metadata().state_dict_metadata
    shapes = {p.key: p.global_shape for p in pieces}
    for key, shape in shapes.items():
        if key not in md:
            _fail(f"--input: {path}: missing tensor {key!r}")
        if tuple(md[key].size) != shape:
            _fail(f"--input: {path}: tensor {key!r} has shape {tuple(md[key].size)}, expected {shape}")
    for key, value in md.items():
        if isinstance(value, TensorStorageMetadata) and not key.startswith("optimizer.") and key not in shapes:
            _fail(f"--input: {path}: unexpected tensor {key!r}")

    by_name = {p.hf_name: p for p in pieces}
    outputs = [(p.hf_name, p) for p in pieces] + [(d, by_name[s]) for d, s in mtp_duplicates(cfg).items()]

    def nbytes(name, piece):
        n = math.prod(piece.shape)
        if fp8 and quantized_in_fp8(name, piece.shape):
            return n + 4 * math.prod(_fp8_scale_shape(piece.shape))
        return n * md[piece.key].properties.dtype.itemsize

    shards, current, size = [], [], 0
    for name, piece in outputs:
        if current and size + nbytes(name, piece) > limit:
            shards.append(current)
            current, size = [], 0
        current.append((name, piece))
        size += nbytes(name, piece)
    shards.append(current)

    def work(tmp: Path) -> None:
        if _rank() != 0:
            return
        tmp.mkdir()
        weight_map, bar = {}, _progress(len(outputs), "mcore-to-hf", progress)
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            buffers, regions = {}, []
            for name, piece in shard:
                where = (piece.key, piece.offsets)
                if where not in buffers:
                    buffers[where] = torch.empty(piece.chunk_shape, dtype=md[piece.key].properties.dtype)
                    regions.append((piece.key, piece.offsets, buffers[where]))
            dcp_io.load_regions(reader, regions)
            tensors, seen = {}, set()
            for name, piece in shard:
                where = (piece.key, piece.offsets)
                t = buffers[where].view(piece.shape)
                t = t.clone() if where in seen else t  # safetensors refuses tensors sharing memory
                seen.add(where)
                if piece.rope is not None and not interleaved:
                    t = t[rope_order(*piece.rope, to_interleaved=False)]
                if not all_finite(t):
                    _fail(f"{piece.key}: holds NaN or Inf values; refusing to export them (as {name})")
                if fp8 and quantized_in_fp8(name, piece.shape):
                    t, scale = quantize_blockwise(t, FP8_BLOCK, name=name)
                    tensors[name + "_scale_inv"] = scale
                    weight_map[name + "_scale_inv"] = file
                tensors[name] = t.contiguous()
                weight_map[name] = file
                bar.update()
            del buffers, regions
            save_file(tensors, str(tmp / file), metadata={"format": "pt"})
            del tensors
        bar.close()
        total = sum(nbytes(n, p) for n, p in outputs)
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        config = dict(hf_cfg)
        config.pop("quantization_config", None)
        if fp8:
            config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                             "weight_block_size": list(FP8_BLOCK)}
        (tmp / "config.json").write_text(json.dumps(config, indent=2))

    _run_in_tmp(out, work)
    return out


# ---------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsv3-convert", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("hf-to-mcore", help="Hugging Face safetensors folder -> megatron-core checkpoint folder")
    a.add_argument("--input", required=True, help="HF folder: config.json + model.safetensors[.index.json]")
    a.add_argument("--output", required=True, help="CKPT_DIR to create (what dsv3-pretrain --load reads)")
    a.add_argument("--tensor-model-parallel-size", type=int, default=1)
    a.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    a.add_argument("--expert-model-parallel-size", type=int, default=1)
    a.add_argument("--backend", choices=("local", "te"), default="local")
    a.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="cast every tensor (default: keep; FP8 weights are dequantized to bfloat16)")
    a.add_argument("--no-progress", action="store_true")
    b = sub.add_parser("mcore-to-hf", help="megatron-core checkpoint folder -> Hugging Face safetensors folder")
    b.add_argument("--input", required=True, help="CKPT_DIR (latest_checkpointed_iteration.txt + iter_N/)")
    b.add_argument("--output", required=True, help="HF folder to create")
    b.add_argument("--fp8", action="store_true", help="write quantized 2-D weights as E4M3 + weight_scale_inv")
    b.add_argument("--max-shard-size", default="5GB")
    b.add_argument("--hf-config", default=None, help="config.json to use (default: the one kept by hf-to-mcore)")
    b.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None) -> int:
    from megatron_dsv3.cli.errors import report_usage_error
    from megatron_dsv3.notices import quiet_third_party

    quiet_third_party()
    args = _parser().parse_args(argv)
    try:
        if args.command == "hf-to-mcore":
            path = hf_to_mcore(args.input, args.output, tp=args.tensor_model_parallel_size,
                               pp=args.pipeline_model_parallel_size, ep=args.expert_model_parallel_size,
                               backend=args.backend, dtype=args.dtype, progress=not args.no_progress)
        else:
            path = mcore_to_hf(args.input, args.output, fp8=args.fp8, max_shard_size=args.max_shard_size,
                               hf_config=args.hf_config, progress=not args.no_progress)
    except ConversionError as exc:
        report_usage_error("dsv3-convert", exc)
        return 2
    if _rank() == 0:
        print(json.dumps({"command": args.command, "output": str(path)}))
    return 0


def cli() -> None:
    """The `dsv3-convert` console script."""
    from megatron_dsv3.cli.exit import exit_after

    exit_after(main)


if __name__ == "__main__":
    cli()
