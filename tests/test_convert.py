"""dsv3-convert: bit-exact round trips (TP1/EP1 and a 2-rank EP=2 layout), FP8 import against transformers,
streaming memory bound, and one-line errors for bad inputs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import megatron_dsv3 as m
from megatron_dsv3.checkpoint import convert
from megatron_dsv3.checkpoint.dist import load_checkpoint
from megatron_dsv3.checkpoint.hf import config_from_hf
from megatron_dsv3.fp8 import dequantize_blockwise, quantize_blockwise
from tests.distributed import REPO, gloo_ranks
from tests.hf_oracle import random_hf_model, tiny_hf_config
from tests.test_hf_import import _mtp_tensors, _per_expert_layout

BLOCK = (128, 128)


def write_hf(folder: Path, tensors: dict, config: dict, shards: int = 3) -> Path:
    """config.json + `shards` safetensors files (round-robin, so layers straddle shards) + index."""
    folder.mkdir(parents=True)
    names = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n].clone().contiguous() for n in names[s::shards]}
        save_file(part, str(folder / file))
        weight_map.update({n: file for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def read_hf(folder: Path) -> dict:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def tiny_checkpoint(tmp_path: Path, dtype=torch.float32, **overrides):
    """A random tiny DeepSeek-V3 in the public layout (per-expert tensors, MTP as layer L), and its tensors."""
    hf_config = tiny_hf_config(num_mtp_layers=1, **overrides)
    hf = random_hf_model(hf_config)
    cfg = config_from_hf(hf_config)
    state = _per_expert_layout({k: v.detach() for k, v in hf.state_dict().items()})
    state.update(_mtp_tensors(state, cfg))
    state = {k: v.to(dtype).contiguous() for k, v in state.items()}
    config = hf_config.to_dict()
    config["num_nextn_predict_layers"] = 1
    return hf, hf_config, state, config


def assert_identical(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_bit_identical(runtime, tmp_path, dtype):
    _, _, state, config = tiny_checkpoint(tmp_path, dtype)
    src = write_hf(tmp_path / "hf", state, config)
    assert convert.main(["hf-to-mcore", "--input", str(src), "--output", str(tmp_path / "ckpt"), "--no-progress"]) == 0
    from megatron.core.dist_checkpointing.validation import verify_integrity_manifest

    verify_integrity_manifest(str(tmp_path / "ckpt" / "iter_0000000"))  # megatron-core accepts our manifest
    assert convert.main(["mcore-to-hf", "--input", str(tmp_path / "ckpt"), "--output", str(tmp_path / "back"),
                         "--max-shard-size", "40KB", "--no-progress"]) == 0
    assert len(list((tmp_path / "back").glob("*.safetensors"))) > 3
    assert_identical(read_hf(tmp_path / "back"), state)
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == json.loads(json.dumps(config))


def test_rotate_half_rope_round_trip(runtime, tmp_path):
    _, _, state, config = tiny_checkpoint(tmp_path)
    config["rope_interleave"] = False
    src = write_hf(tmp_path / "hf", state, config, shards=1)
    convert.hf_to_mcore(src, tmp_path / "ckpt", progress=False)
    convert.mcore_to_hf(tmp_path / "ckpt", tmp_path / "back", progress=False)
    assert_identical(read_hf(tmp_path / "back"), state)


def _megatron_core_layout(cfg):
    """The oracle: keys, global shapes, chunk offsets and object keys from megatron-core's sharded_state_dict()."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensorFactory

    with torch.device("meta"):
        model = m.build_model(cfg, backend="local", perform_initialization=False)
    tensors, objects = [], []
    for item in model.sharded_state_dict().values():
        if isinstance(item, ShardedObject):
            objects.append(item.unique_key)
            continue
        parts = item.build() if isinstance(item, ShardedTensorFactory) else [item]
        for t in parts.values() if isinstance(parts, dict) else parts:
            tensors.append((t.key, tuple(t.global_shape), tuple(t.global_offset),
                            (1,) * t.prepend_axis_num + tuple(t.local_shape)))
    return tensors, objects


@pytest.mark.parametrize("changes", [
    {},
    dict(q_lora_rank=None, tie_word_embeddings=True, n_shared_experts=2, num_nextn_predict_layers=2),
    dict(n_shared_experts=0, num_nextn_predict_layers=0, first_k_dense_replace=0, n_routed_experts=4, n_group=2,
         topk_group=1),
    dict(num_hidden_layers=3, first_k_dense_replace=2, moe_intermediate_size=24, intermediate_size=72),
], ids=["tiny", "no-q-lora-tied-2mtp", "all-moe-no-shared", "two-dense"])
def test_checkpoint_layout_matches_megatron_core(runtime, changes):
    """The converter's own layout (no megatron-core import) is exactly what megatron-core's model lists."""
    from megatron_dsv3.checkpoint.mapping import checkpoint_layout

    cfg = m.presets.get_preset("tiny").replace(**changes)
    pieces, objects = checkpoint_layout(cfg)
    tensors, ref_objects = _megatron_core_layout(cfg)
    assert [(p.key, p.global_shape, p.offsets, p.chunk_shape) for p in pieces] == tensors
    assert objects == ref_objects
    assert len({p.hf_name for p in pieces}) == len(pieces)


def test_converter_does_not_import_megatron_core():
    code = ("import sys, megatron_dsv3.checkpoint.convert, megatron_dsv3.checkpoint.hf; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('megatron', 'wandb', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def _fp8_checkpoint(state: dict):
    """Quantize the 2-D weights DeepSeek quantizes; also return the dequantized (fp32) tensors."""
    from megatron_dsv3.checkpoint.mapping import quantized_in_fp8

    out, deq = {}, {}
    for name, t in state.items():
        if quantized_in_fp8(name, t.shape):
            q, s = quantize_blockwise(t, BLOCK)
            out[name], out[name + "_scale_inv"] = q, s
            deq[name] = dequantize_blockwise(q, s, BLOCK, torch.float32)
            scale = s.repeat_interleave(128, 0)[: t.shape[0]].repeat_interleave(128, 1)[:, : t.shape[1]]
            assert ((deq[name] - t).abs() <= t.abs() / 16 + scale * 2.0 ** -9).all(), name  # E4M3: 3 mantissa bits
        else:
            out[name] = deq[name] = t
    return out, deq


def _fused(per_expert: dict, like: dict) -> dict:
    """transformers 5's in-memory layout (stacked experts) from per-expert tensors."""
    out = {}
    for name, ref in like.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            p = name[: -len("gate_up_proj")]
            out[name] = torch.stack([torch.cat([per_expert[f"{p}{e}.gate_proj.weight"],
                                                per_expert[f"{p}{e}.up_proj.weight"]]) for e in range(ref.shape[0])])
        elif name.endswith("mlp.experts.down_proj"):
            p = name[: -len("down_proj")]
            out[name] = torch.stack([per_expert[f"{p}{e}.down_proj.weight"] for e in range(ref.shape[0])])
        else:
            out[name] = per_expert[name]
    return out


def test_fp8_import_matches_transformers(runtime, tmp_path):
    hf, hf_config, state, config = tiny_checkpoint(tmp_path)
    fp8_state, deq = _fp8_checkpoint(state)
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
                                     "activation_scheme": "dynamic"}
    src = write_hf(tmp_path / "hf", fp8_state, config, shards=2)
    assert convert.main(["hf-to-mcore", "--input", str(src), "--output", str(tmp_path / "ckpt"),
                         "--dtype", "float32", "--no-progress"]) == 0
    cfg = config_from_hf(hf_config)
    model = m.build_model(cfg).eval()
    load_checkpoint(tmp_path / "ckpt", [model], load_rng=False)
    hf.load_state_dict(_fused(deq, hf.state_dict()), strict=True)
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        ours = model(ids, torch.arange(12).expand(2, 12), None)
        ref = hf(ids).logits
    assert (ours - ref).abs().max().item() <= 1e-5
    # exported back without --fp8: the dequantized fp32 tensors; with --fp8: the same E4M3 bytes and scales
    convert.mcore_to_hf(tmp_path / "ckpt", tmp_path / "back", progress=False)
    assert_identical(read_hf(tmp_path / "back"), {k: v.to(torch.float32) for k, v in deq.items()})
    convert.mcore_to_hf(tmp_path / "ckpt", tmp_path / "back8", fp8=True, progress=False)
    back8 = read_hf(tmp_path / "back8")
    assert sorted(back8) == sorted(fp8_state)
    for name, t in back8.items():  # re-quantizing dequantized E4M3 may pick the other power-of-2 scale
        assert t.dtype == fp8_state[name].dtype, name
        if t.dtype == torch.float8_e4m3fn:
            again = dequantize_blockwise(t, back8[name + "_scale_inv"], BLOCK, torch.float32)
            torch.testing.assert_close(again, deq[name], rtol=0, atol=1e-6)
    assert "quantization_config" in json.loads((tmp_path / "back8" / "config.json").read_text())


def _cli(*args, cwd=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "megatron_dsv3.checkpoint.convert", *args], env=env,
                          capture_output=True, text=True, timeout=600, cwd=cwd)


@pytest.mark.parametrize("case", ["missing", "unexpected", "misshaped", "no_input"])
def test_bad_inputs_exit_2_with_one_line(runtime, tmp_path, case):
    _, _, state, config = tiny_checkpoint(tmp_path)
    name = "model.layers.2.mlp.experts.5.up_proj.weight"
    if case == "missing":
        del state[name]
    elif case == "unexpected":
        state["model.layers.2.mlp.experts.99.up_proj.weight"] = state[name]
        name = "model.layers.2.mlp.experts.99.up_proj.weight"
    elif case == "misshaped":
        state[name] = state[name][:, :-1]
    src = write_hf(tmp_path / "hf", state, config)
    if case == "no_input":
        src, name = tmp_path / "nowhere", str(tmp_path / "nowhere")
    out = tmp_path / "ckpt"
    result = _cli("hf-to-mcore", "--input", str(src), "--output", str(out), "--no-progress")
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [l for l in result.stderr.splitlines() if l.startswith("dsv3-convert: error:")]
    assert len(errors) == 1 and name in errors[0] and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert not out.exists() and not list(tmp_path.glob(".ckpt.tmp-*"))


def test_command_exits_0_after_printing_its_result_and_a_valid_manifest(runtime, tmp_path):
    """The console entry (`cli`: main, then an exit that skips the last garbage collection) still flushes the
    result line and leaves every file complete: megatron-core verifies the manifest over all of them."""
    from megatron.core.dist_checkpointing.validation import verify_integrity_manifest

    _, _, state, config = tiny_checkpoint(tmp_path)
    src, out = write_hf(tmp_path / "hf", state, config), tmp_path / "ckpt"
    result = _cli("hf-to-mcore", "--input", str(src), "--output", str(out), "--no-progress")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.splitlines()[-1]) == {"command": "hf-to-mcore", "output": str(out)}
    manifest = json.loads((out / "iter_0000000" / "integrity.json").read_text())["files"]
    on_disk = {p.name for p in (out / "iter_0000000").iterdir()} - {"integrity.json"}
    assert set(manifest) == on_disk and any(name.endswith(".distcp") for name in on_disk)
    verify_integrity_manifest(str(out / "iter_0000000"))


def test_bad_mcore_input_exit_2(runtime, tmp_path):
    assert convert.main(["mcore-to-hf", "--input", str(tmp_path / "none"), "--output", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


def _synthetic(folder: Path, shards: int, hidden: int, experts: int, layers: int, vocab: int):
    """Random tensors shaped by a DeepSeek-V3 config, written one shard at a time (kept small in this process)."""
    from megatron_dsv3.checkpoint.mapping import checkpoint_layout

    config = tiny_hf_config(hidden_size=hidden, intermediate_size=2 * hidden, moe_intermediate_size=hidden,
                            n_routed_experts=experts, n_group=4, num_hidden_layers=layers, vocab_size=vocab,
                            num_mtp_layers=0).to_dict()
    config["num_nextn_predict_layers"] = 0
    pieces, _ = checkpoint_layout(config_from_hf(config))
    total = sum(4 * torch.Size(p.shape).numel() for p in pieces)
    folder.mkdir(parents=True)
    weight_map, current, size, index, sizes = {}, {}, 0, 0, []

    def flush():
        nonlocal current, size, index
        file = f"model-{index:05d}.safetensors"
        save_file(current, str(folder / file))
        weight_map.update({n: file for n in current})
        sizes.append((folder / file).stat().st_size)
        current, size, index = {}, 0, index + 1

    for p in pieces:
        current[p.hf_name] = torch.randn(p.shape)
        size += 4 * current[p.hf_name].numel()
        if size >= total / shards:
            flush()
    if current:
        flush()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config))
    return sizes, total


_MEASURE = """
import sys
from megatron_dsv3.checkpoint.convert import main
rc = main(sys.argv[1:])
hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]
print('VMHWM_KB', hwm, rc)
"""


def _peak_kb(*args) -> int:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-c", _MEASURE, *args], env=env, capture_output=True, text=True,
                            timeout=900)
    line = [l for l in result.stdout.splitlines() if l.startswith("VMHWM_KB")]
    assert line and line[0].split()[2] == "0", result.stderr[-3000:]
    return int(line[0].split()[1])


@pytest.mark.slow
def test_peak_memory_is_bounded_by_the_largest_shard(runtime, tmp_path):
    tiny_sizes, _ = _synthetic(tmp_path / "tiny", 1, 64, 8, 2, 256)
    sizes, total = _synthetic(tmp_path / "big", 4, 256, 32, 5, 16384)
    base = _peak_kb("hf-to-mcore", "--input", str(tmp_path / "tiny"), "--output", str(tmp_path / "t1"), "--no-progress")
    peak = _peak_kb("hf-to-mcore", "--input", str(tmp_path / "big"), "--output", str(tmp_path / "b1"), "--no-progress")
    base_out = _peak_kb("mcore-to-hf", "--input", str(tmp_path / "t1"), "--output", str(tmp_path / "t2"),
                        "--no-progress")
    peak_out = _peak_kb("mcore-to-hf", "--input", str(tmp_path / "b1"), "--output", str(tmp_path / "b2"),
                        "--max-shard-size", str(max(sizes)), "--no-progress")
    largest = max(sizes) / 1024
    report = dict(shards_mb=[round(s / 2**20, 1) for s in sizes], model_mb=round(total / 2**20, 1),
                  import_base_mb=round(base / 1024), import_peak_mb=round(peak / 1024),
                  export_base_mb=round(base_out / 1024), export_peak_mb=round(peak_out / 1024))
    print("convert memory:", json.dumps(report))
    # Fixed overhead: the tiny run's peak (interpreter, torch, megatron-core) plus a constant allowance for
    # per-run bookkeeping (metadata, tqdm, allocator slack) that does not grow with the model.
    fixed_kb = 16 * 1024
    assert len(sizes) >= 4 and total / 2**20 > 120
    assert peak - base < 2 * largest + fixed_kb, report
    assert peak_out - base_out < 2 * largest + fixed_kb, report
    assert max(peak - base, peak_out - base_out) < 0.75 * total / 1024  # streams: never the whole model
    assert_identical(read_hf(tmp_path / "b2"), read_hf(tmp_path / "big"))


@pytest.mark.slow
def test_two_rank_conversion_equals_one_rank(runtime, tmp_path):
    """`torchrun --nproc-per-node 2 dsv3-convert hf-to-mcore`: the ranks split the tensors, one checkpoint."""
    from tests.distributed import free_port

    _, _, state, config = tiny_checkpoint(tmp_path)
    src = write_hf(tmp_path / "hf", state, config)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
           "-m", "megatron_dsv3.checkpoint.convert", "hf-to-mcore", "--input", str(src), "--output",
           str(tmp_path / "ckpt"), "--no-progress"]
    result = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)), cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count('"command": "hf-to-mcore"') == 1  # rank 0 reports
    assert not list(tmp_path.glob(".ckpt.tmp-*"))
    convert.mcore_to_hf(tmp_path / "ckpt", tmp_path / "back", progress=False)
    assert_identical(read_hf(tmp_path / "back"), state)


@pytest.mark.slow
def test_ep2_layout_round_trip(runtime, tmp_path):
    """HF -> mcore, loaded and re-saved by a 2-rank EP=2 job (megatron-core's own expert chunking) -> HF."""
    _, _, state, config = tiny_checkpoint(tmp_path)
    src = write_hf(tmp_path / "hf", state, config)
    assert convert.main(["hf-to-mcore", "--input", str(src), "--output", str(tmp_path / "ckpt"),
                         "--no-progress"]) == 0
    results = gloo_ranks("convert_ep2.py", 2, tmp_path / "out", str(src), str(tmp_path))
    assert all(r["loaded_experts"] == 4 for r in results)
    assert convert.main(["mcore-to-hf", "--input", str(tmp_path / "trained"), "--output",
                         str(tmp_path / "back"), "--hf-config", str(src / "config.json"),
                         "--max-shard-size", "30KB", "--no-progress"]) == 0
    assert_identical(read_hf(tmp_path / "back"), state)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_all_finite_flags_nan_and_inf_but_not_large_finite_values(dtype):
    """The converter's NaN/Inf check finds every NaN and Inf, and values whose sum overflows (fp16: 10 x 60000)
    are still finite."""
    from megatron_dsv3.checkpoint.errors import all_finite

    big = torch.full((10,), 60000.0, dtype=dtype)
    assert all_finite(big) and all_finite(torch.randn(1000).to(dtype))
    for bad in (float("nan"), float("inf"), float("-inf")):
        t = big.clone()
        t[3] = bad
        assert not all_finite(t), bad
    pair = big.clone()
    pair[1], pair[2] = float("inf"), float("-inf")   # inf - inf: the sum is NaN, still caught
    assert not all_finite(pair)


def test_write_part_digests_are_the_written_files_sha256(tmp_path):
    """The digests taken while DCP writes (integrity.json reads nothing back) are those of the files on disk."""
    import hashlib

    from megatron_dsv3.checkpoint import dcp_io

    g = torch.Generator().manual_seed(0)
    chunks = [(f"t{i}", (2 * n, 3), (n, 0), torch.randn(n, 3, generator=g)) for i, n in enumerate((1, 7, 5000, 40000))]
    digests = dcp_io.write_part(tmp_path / "part", chunks, {"obj/shard_0_1": {"a": 1}})
    files = sorted(p for p in (tmp_path / "part").iterdir() if p.suffix == ".distcp")
    assert sorted(digests) == files and len(files) >= 1
    for path, digest in digests.items():
        assert digest == hashlib.sha256(path.read_bytes()).hexdigest(), path


def test_write_part_skips_torch_save_crc32_in_every_writer_thread_and_loads_back(tmp_path):
    """DCP's writer threads torch.save each item without the per-record CRC32 (the setting is per thread, so it
    must be made in the thread that writes; integrity.json's SHA-256 covers the files), the caller's setting is
    left as it was, and the part loads back exactly."""
    import re
    import struct

    from megatron_dsv3.checkpoint import dcp_io

    g = torch.Generator().manual_seed(1)
    chunks = [(f"t{i}", (n, 4), (0, 0), torch.randn(n, 4, generator=g)) for i, n in enumerate((3, 9000, 20000, 5))]
    assert torch.serialization.get_crc32_options()
    dcp_io.write_part(tmp_path / "part", chunks)
    assert torch.serialization.get_crc32_options()
    files = sorted((tmp_path / "part").glob("*.distcp"))
    assert len(files) == 2  # both writer threads wrote a file
    for path in files:
        data = path.read_bytes()
        crcs = [struct.unpack_from("<I", data, m.start() + 16)[0] for m in re.finditer(b"PK\x01\x02", data)]  # central directory's CRC-32 field
        assert crcs and not any(crcs), path
    dcp_io.merge_parts([tmp_path / "part"], tmp_path / "merged")  # as the converter publishes a part
    reader = dcp_io.CheckpointReader(str(tmp_path / "merged"))
    for key, shape, offsets, tensor in chunks:
        out = torch.empty_like(tensor)
        dcp_io.load_regions(reader, [(key, offsets, out)])
        assert torch.equal(out, tensor), key


def test_hashing_stream_hashes_exactly_what_reaches_the_file_through_short_writes(tmp_path):
    """Large buffers go through in pieces, and a raw file that takes fewer bytes than offered still ends up
    with every byte once, and the digest of exactly those bytes."""
    import hashlib
    import io

    from megatron_dsv3.checkpoint.dcp_io import _HashingStream

    class Stingy(io.RawIOBase):  # takes at most 100,000 bytes a call, as an unbuffered file may
        def __init__(self, f):
            self.f = f

        def writable(self):
            return True

        def write(self, b):
            return self.f.write(bytes(memoryview(b)[:100_000]))

    data = [torch.randn(n, generator=torch.Generator().manual_seed(n)).numpy().tobytes() for n in (3, 300_000, 70_001)]
    for raw_of in (lambda f: f, Stingy):
        path = tmp_path / "out.bin"
        with open(path, "wb") as f:
            stream = _HashingStream(raw_of(f))
            for chunk in data:
                assert stream.write(memoryview(chunk)) == len(chunk)
        expected = b"".join(data)
        assert path.read_bytes() == expected
        assert stream.hash.hexdigest() == hashlib.sha256(expected).hexdigest()
