"""Where users wait, measured side by side in one run (interleaved repeats, medians, printed as ratios).

    python benchmarks/speed.py                       # every section
    python benchmarks/speed.py --only decode spec    # some of: decode spec train trainer convert

Sections (ratio < 1 means ours is faster):
  decode   greedy decoding of a random DeepSeek-V3-shaped HF model imported into ours: our latent-cache engine
           vs transformers `generate`, batch 1 and 8, tokens checked identical
  spec     MTP speculative vs plain greedy decoding on the `make run` model (trained here if missing)
  train    one fwd+bwd+AdamW step: ours vs megatron-core's native DeepSeek-V3 specs vs transformers; MTP on/off
           beside the FLOP ratio MTP adds (torch.utils.flop_counter on the same batch);
           ours with --moe-grouped-gemm
  trainer  dsv3-pretrain's tokens/s vs a bare forward+backward+AdamW loop of the same model and batch
  convert  dsv3-convert hf-to-mcore vs a plain safetensors read + write of the same >= 1 GB checkpoint
Ends with one JSON line of every ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# The DeepSeek-V3 shape: hidden 256, 4 layers (first dense), 16 routed experts top-4 in 4 groups.
DECODE_SHAPE = dict(vocab_size=2048, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
                    num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8, q_lora_rank=128,
                    kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_shared_experts=1,
                    n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=1,
                    max_position_embeddings=1024, routed_scaling_factor=2.5, num_mtp_layers=0,
                    eos_token_id=None, bos_token_id=None, pad_token_id=None, attn_implementation="eager",
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def synchronize() -> None:
    """Wait for the GPU kernels still queued, so a timing covers them (nothing to wait for without CUDA)."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def interleaved(runs: dict, repeats: int, between=None) -> dict[str, float]:
    """Median seconds of each callable, run round-robin `repeats` times after one warm-up each; `between()`
    runs untimed before every call (to clear what the previous call left behind)."""
    for fn in runs.values():
        if between is not None:
            between()
        fn()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            if between is not None:
                between()
            t = time.perf_counter()
            fn()
            synchronize()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def random_hf_pair(shape: dict, seed: int = 0, device: str = "cpu"):
    """A random transformers DeepseekV3ForCausalLM and our model with its weights (dsv3 import path), on
    `device`."""
    import transformers

    import megatron_dsv3 as m
    from megatron_dsv3 import runtime
    from megatron_dsv3.checkpoint.hf import config_from_hf, load_hf_state_dict

    torch.manual_seed(seed)
    hf_config = transformers.DeepseekV3Config(**shape)
    hf = transformers.DeepseekV3ForCausalLM(hf_config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0.0, 0.05)
        for name, b in hf.named_buffers():
            if "e_score_correction_bias" in name:
                b.uniform_(-0.05, 0.05)
    runtime.initialize(tp=1, pp=1, ep=1, seed=seed)
    ours = m.build_model(config_from_hf(hf_config), backend="local").eval()
    load_hf_state_dict(ours, hf.state_dict(), rope_interleave=getattr(hf_config, "rope_interleave", True))
    return hf.to(device), ours.to(device)


def decode_section(args) -> dict:
    from megatron_dsv3.inference import InferenceEngine

    hf, ours = random_hf_pair(DECODE_SHAPE, device=args.device)
    engine = InferenceEngine(ours, capacity=args.prompt_len + args.new_tokens)
    result = {}
    for batch in (1, 8):
        prompt = torch.randint(0, DECODE_SHAPE["vocab_size"], (batch, args.prompt_len),
                               generator=torch.Generator().manual_seed(batch)).to(args.device)
        outputs = {}

        def run_ours():
            outputs["ours"] = engine.generate(prompt, args.new_tokens).tokens

        def run_hf():
            with torch.no_grad():
                out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.new_tokens,
                                  do_sample=False, eos_token_id=None, pad_token_id=0)
            outputs["transformers"] = out[:, args.prompt_len:]

        t = interleaved({"ours": run_ours, "transformers": run_hf}, args.repeats)
        same = torch.equal(outputs["ours"], outputs["transformers"])
        tok = batch * args.new_tokens
        print(f"decode batch {batch}: ours {tok / t['ours']:.0f} tok/s, transformers {tok / t['transformers']:.0f} "
              f"tok/s, time ours/transformers {t['ours'] / t['transformers']:.3f}, tokens identical: {same}")
        result[f"decode_b{batch}_ours_over_transformers"] = t["ours"] / t["transformers"]
        result[f"decode_b{batch}_identical"] = same
    return result


def spec_section(args) -> dict:
    """Reuses benchmarks/mtp_speculative.py (the newest `make run` checkpoint, trained first if missing)."""
    import mtp_speculative

    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # it sets torch's thread count from this
    r = mtp_speculative.main(["--new-tokens", str(args.spec_new_tokens)])
    print(f"speculative: acceptance {r['acceptance_rate']:.2f}, {r['spec_tokens_per_main_step']:.2f} tokens per "
          f"main step, wall clock {r['wall_speedup']:.2f}x greedy, tokens identical: {r['outputs_identical']}")
    return {"spec_wall_speedup": r["wall_speedup"], "spec_tokens_per_main_step": r["spec_tokens_per_main_step"],
            "spec_acceptance": r["acceptance_rate"], "spec_identical": r["outputs_identical"]}


def _batch(vocab: int, batch: int, seq: int, seed: int = 0, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=g).to(device)
    return tokens[:, :-1], tokens[:, 1:]


def _register_native_spec():
    """megatron-core's own DeepSeek-V3 layers (its local MLA, TopKRouter and MoE specs) as `mcore-native`."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    from megatron_dsv3 import registry

    from megatron_dsv3.attention.core_attention import MLACoreAttention

    def block(config, backend, vp_stage=None, pp_rank=None):
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm",
                                          vp_stage=vp_stage, pp_rank=pp_rank)
        for layer in spec.layer_specs:  # megatron-core's local DotProductAttention takes no k_channels (MLA's
            layer.submodules.self_attention.submodules.core_attention = MLACoreAttention  # q/k != v dims)
        return spec

    if "mcore-native" not in registry.names():
        registry.register(registry.ModelSpec("mcore-native", block, lambda *a, **k: None))


def _reset_megatron_step_state():
    from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
    from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler

    destroy_moe_metrics_tracker()  # models with and without MTP log different layer counts
    # A backward outside megatron-core's schedules leaves 0-d loss scales that its schedules (which set
    # [1]-shaped ones) cannot copy into; the trainer section runs those schedules in this process.
    MoEAuxLossAutoScaler.main_loss_backward_scale, MTPLossAutoScaler.main_loss_backward_scale = None, torch.tensor(1.0)


def _step_fn(model, optimizer, forward):
    def step():
        loss = forward(model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _reset_megatron_step_state()
    return step


def _step_flops(model, forward) -> int:
    """Forward + backward FLOPs of one step, counted by torch's FLOP counter (matmuls, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        forward(model).backward()
    model.zero_grad(set_to_none=True)
    _reset_megatron_step_state()
    return counter.get_total_flops()


def train_section(args) -> dict:
    """fwd + bwd + AdamW of one batch on the decode section's shape: ours, megatron-core native, transformers;
    then ours with and without one MTP module."""
    import transformers

    import megatron_dsv3 as m
    from megatron_dsv3 import runtime
    from megatron_dsv3.checkpoint.hf import config_from_hf

    hf_config = transformers.DeepseekV3Config(**DECODE_SHAPE)
    cfg = config_from_hf(hf_config).replace(num_nextn_predict_layers=0)
    runtime.initialize(tp=1, pp=1, ep=1, seed=0)
    _register_native_spec()
    tokens, labels = _batch(cfg.vocab_size, args.train_batch, args.train_seq, device=args.device)
    positions = torch.arange(args.train_seq, device=args.device).expand_as(tokens)

    def mcore_forward(model):
        return model(tokens, positions, None, labels=labels).float().mean()

    def hf_forward(model):
        return model(tokens, labels=labels).loss

    def adam(model):
        return torch.optim.AdamW(model.parameters(), lr=1e-4)

    torch.manual_seed(0)
    ours = m.build_model(cfg, backend="local").to(args.device)
    native = m.build_model(cfg, backend="local", spec="mcore-native").to(args.device)
    hf = transformers.DeepseekV3ForCausalLM(hf_config).to(args.device)
    mtp_model = m.build_model(cfg.replace(num_nextn_predict_layers=1), backend="local").to(args.device)
    # --moe-grouped-gemm: the local backend's grouped experts (bitwise equal to SequentialMLP's, which both
    # specs use by default, as megatron-core does without the flag)
    grouped = m.build_model(cfg, backend="local", moe_grouped_gemm=True).to(args.device)
    runs = {"ours": _step_fn(ours, adam(ours), mcore_forward), "native": _step_fn(native, adam(native), mcore_forward),
            "transformers": _step_fn(hf, adam(hf), hf_forward),
            "ours_mtp": _step_fn(mtp_model, adam(mtp_model), mcore_forward),
            "ours_grouped": _step_fn(grouped, adam(grouped), mcore_forward)}
    # The arithmetic MTP adds (a full MoE layer, eh_proj, a second head and cross-entropy), counted on the same
    # batch: the time ratio is judged against it, since no schedule makes a FLOP free.
    mtp_flops = _step_flops(mtp_model, mcore_forward) / _step_flops(ours, mcore_forward)
    t = interleaved(runs, args.repeats * 2)
    tok = args.train_batch * args.train_seq
    print(f"train step: ours {tok / t['ours']:.0f} tok/s; ours/native {t['ours'] / t['native']:.3f}, "
          f"ours/transformers {t['ours'] / t['transformers']:.3f}, MTP on/off {t['ours_mtp'] / t['ours']:.3f} "
          f"(FLOPs {mtp_flops:.3f}), ours with --moe-grouped-gemm/native {t['ours_grouped'] / t['native']:.3f}")
    return {"train_ours_over_native": t["ours"] / t["native"], "train_ours_over_transformers": t["ours"] / t["transformers"],
            "train_mtp_on_over_off": t["ours_mtp"] / t["ours"], "train_mtp_flops_on_over_off": mtp_flops,
            "train_grouped_gemm_over_native": t["ours_grouped"] / t["native"]}


def trainer_section(args) -> dict:
    """dsv3-pretrain's loop (built-in data, megatron-core DDP and optimizer, clipping, metrics) vs a bare
    forward + backward + AdamW loop of the same tiny model and batch, each timed over whole iterations."""
    import megatron_dsv3 as m
    from megatron_dsv3 import runtime
    from megatron_dsv3.training.pretrain import prepare
    from megatron_dsv3.training.trainer import Trainer

    iters, seq, batch = args.trainer_iters, 64, 8
    argv = ["--preset", "tiny", "--seq-length", str(seq), "--micro-batch-size", str(batch), "--train-iters",
            str(iters), "--lr", "3e-3", "--lr-warmup-iters", "2", "--eval-iters", "0", "--no-progress"]

    def trainer_loop():
        trainer = Trainer(*prepare(argv))
        try:
            t = time.perf_counter()
            trainer.train()
            return time.perf_counter() - t
        finally:
            trainer.close()

    def bare_loop():
        cfg = m.presets.get_preset("tiny")
        runtime.initialize(seed=1234)
        try:
            model = m.build_model(cfg, backend="local")
            step = _step_fn(model, torch.optim.AdamW(model.parameters(), lr=3e-3), lambda mdl: mdl(
                tokens, torch.arange(seq).expand_as(tokens), None, labels=labels).float().mean())
            tokens, labels = _batch(cfg.vocab_size, batch, seq)
            t = time.perf_counter()
            for _ in range(iters):
                step()
            return time.perf_counter() - t
        finally:
            runtime.shutdown()

    times = {"trainer": [], "bare": []}
    for _ in range(args.repeats):
        times["trainer"].append(trainer_loop())
        times["bare"].append(bare_loop())
    t = {k: statistics.median(v) / iters for k, v in times.items()}
    print(f"trainer: dsv3-pretrain {batch * seq / t['trainer']:.0f} tok/s, bare loop {batch * seq / t['bare']:.0f} "
          f"tok/s, trainer/bare {t['trainer'] / t['bare']:.3f}")
    return {"trainer_over_bare_loop": t["trainer"] / t["bare"]}


# About 1.2 GB of fp32 weights, most of them routed experts, as in the real checkpoint.
CONVERT_SHAPE = dict(DECODE_SHAPE, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512,
                     n_routed_experts=64, num_experts_per_tok=6, n_group=8, topk_group=4, num_hidden_layers=4,
                     num_attention_heads=16, num_key_value_heads=16, q_lora_rank=384, kv_lora_rank=256,
                     qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, vocab_size=8192)


def convert_section(args) -> dict:
    """`dsv3-convert hf-to-mcore` as a user runs it (a fresh process, imports included) vs a fresh process
    that reads every safetensors shard and writes the same tensors back, on one >= 1 GB checkpoint."""
    import shutil
    import subprocess
    import tempfile

    import transformers

    command = Path(sys.executable).with_name("dsv3-convert")  # the console script, as users run it
    if not command.is_file():
        command = shutil.which("dsv3-convert")
    if command is None:
        raise SystemExit(f"speed.py convert: no dsv3-convert next to {sys.executable} or on PATH; install the "
                         "package into this interpreter (`make install`)")
    work = Path(tempfile.mkdtemp(prefix="dsv3-speed-convert-"))
    try:
        hf_dir = work / "hf"
        model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**CONVERT_SHAPE))
        model.save_pretrained(hf_dir, max_shard_size="400MB")
        del model
        shards = sorted(hf_dir.glob("*.safetensors"))
        size = sum(p.stat().st_size for p in shards)

        copy_shards = ("import os, sys; from pathlib import Path; from safetensors.torch import load_file, save_file\n"
                       "for shard in sys.argv[3:]:\n"
                       "    save_file(load_file(shard), Path(sys.argv[2]) / Path(shard).name)\n"
                       "    if sys.argv[1] == 'fsync':\n"
                       "        fd = os.open(Path(sys.argv[2]) / Path(shard).name, os.O_RDONLY); os.fsync(fd); os.close(fd)")

        def plain(durable: bool = False):  # the same fresh-process start (python, torch) as the converter's
            out = work / "plain"
            out.mkdir(exist_ok=True)
            subprocess.run([sys.executable, "-c", copy_shards, "fsync" if durable else "-", str(out),
                            *map(str, shards)], check=True)

        def convert():
            out = work / "mcore"
            subprocess.run([str(command), "hf-to-mcore", "--input", str(hf_dir), "--output", str(out),
                            "--no-progress"], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def settle():  # untimed: the last run's output goes, and nothing is left for the kernel to write back
            for out in (work / "plain", work / "mcore"):
                shutil.rmtree(out, ignore_errors=True)
            os.sync()

        # Each run starts with no dirty pages and no output: the plain copy leaves ~1 GB for the kernel to write
        # back later, which would otherwise land in the next run's time (the converter fsyncs its own output),
        # and deleting an output (0.1-0.25 s) is not part of making it.
        # The converter fsyncs what it writes (a checkpoint survives a crash); `plain_fsync` is the same copy made
        # as durable, so the disk's share of the difference shows.
        t = interleaved({"plain": plain, "plain_fsync": lambda: plain(durable=True), "convert": convert},
                        args.repeats, between=settle)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rate = {name: size / 1e6 / seconds for name, seconds in t.items()}
    print(f"convert: {size / 1e9:.2f} GB, dsv3-convert {rate['convert']:.0f} MB/s, plain safetensors read + write "
          f"{rate['plain']:.0f} MB/s ({rate['plain_fsync']:.0f} with fsync), convert/plain "
          f"{t['convert'] / t['plain']:.2f} ({t['convert'] / t['plain_fsync']:.2f} against the fsync-ed copy)")
    return {"convert_over_plain_safetensors": t["convert"] / t["plain"],
            "convert_over_plain_fsynced": t["convert"] / t["plain_fsync"], "convert_checkpoint_gb": size / 1e9}


SECTIONS = {"decode": decode_section, "spec": spec_section, "train": train_section, "trainer": trainer_section,
            "convert": convert_section}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=sorted(SECTIONS), default=sorted(SECTIONS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--train-batch", type=int, default=4)
    ap.add_argument("--train-seq", type=int, default=128)
    ap.add_argument("--trainer-iters", type=int, default=30)
    ap.add_argument("--spec-new-tokens", type=int, default=64)
    ap.add_argument("--device", default="cpu", help="where the decode and train sections run (cuda: one GPU)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from megatron_dsv3.notices import quiet_third_party

    quiet_third_party()
    result = {"threads": args.threads}
    for name in args.only:
        result.update(SECTIONS[name](args))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
