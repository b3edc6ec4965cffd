"""Prepared GPU check of the speed issue (one H200, about 3 minutes): run it first when a GPU is lent.

    python benchmarks/gpu_speed_check.py                  # needs CUDA; prints {"status": "skipped"} without
    python benchmarks/gpu_speed_check.py --device cpu --smoke   # every path at toy sizes (what CI runs)

1. decode: `speed.py`'s decode section on the GPU (fp32): our latent-cache engine vs transformers `generate`
   at batch 1 and 8, tokens checked identical;
2. train: `speed.py`'s train section on the GPU (fp32): ours vs megatron-core's native specs vs transformers,
   and MTP on/off;
3. mfu: `dsv3-pretrain --bf16` (megatron-core DDP, FP32 main weights) on the `small` preset, and on a wider
   model (the `v2-lite` shape cut to 4 layers, grouped-GEMM experts) where the GPU has work to do: tokens/s,
   and MFU = FLOPs counted by torch's FlopCounterMode over one micro-batch's forward + backward, times the
   micro-batches, over the step time, against a bf16 matmul peak measured here and the H200's 989 TFLOP/s.

Prints one JSON line (a section that fails records its error and the others still run).
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # noqa: E402  (benchmarks/ is not a package)

H200_BF16_DENSE_TFLOPS = 989.4  # NVIDIA's H200 SXM figure for dense BF16

# (name, dsv3-pretrain flags, micro-batches per step); each runs --train-iters of its own.
MFU_RUNS = [
    ("small", ["--preset", "small", "--seq-length", "1024", "--micro-batch-size", "8"], 2),
    ("v2-lite-4l", ["--preset", "v2-lite", "--num-layers", "4", "--seq-length", "2048", "--micro-batch-size", "2",
                    "--moe-grouped-gemm"], 2),
]
SMOKE_RUNS = [("tiny", ["--preset", "tiny", "--seq-length", "32", "--micro-batch-size", "2"], 2)]


def matmul_peak_tflops(device: str, n: int = 8192, iters: int = 10) -> float:
    """bf16 n x n x n products per second, as the device README measures them (random data, warmed up)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    speed.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        a @ b
    speed.synchronize()
    return 2 * n**3 * iters / (time.perf_counter() - t) / 1e12


def microbatch_flops(cfg, seq: int, micro_batch: int, model_kwargs: dict, device: str) -> int:
    """Forward + backward FLOPs of one micro-batch, counted op by op (matmuls and attention; no recompute).
    torch's counter counts attention in full, the masked (causal) half included, as PaLM's MFU formula does."""
    from megatron.core.transformer.module import Float16Module
    from torch.utils.flop_counter import FlopCounterMode

    import megatron_dsv3 as m

    model = m.build_model(cfg, **model_kwargs)
    model = Float16Module(model.config, model.to(device))  # bf16 weights and compute, as the trainer runs them
    tokens = torch.randint(0, cfg.vocab_size, (micro_batch, seq), device=device)
    positions = torch.arange(seq, device=device).expand_as(tokens)
    with FlopCounterMode(display=False) as counter:
        model(tokens, positions, None, labels=tokens).float().mean().backward()
    return counter.get_total_flops()


def mfu_section(args) -> dict:
    from megatron_dsv3 import runtime
    from megatron_dsv3.training.pretrain import prepare
    from megatron_dsv3.training.trainer import Trainer

    peak = matmul_peak_tflops(args.device, n=1024 if args.smoke else 8192)
    out = {"matmul_peak_tflops": peak}
    for name, flags, micro_batches in SMOKE_RUNS if args.smoke else MFU_RUNS:
        seq, mbs = int(flags[flags.index("--seq-length") + 1]), int(flags[flags.index("--micro-batch-size") + 1])
        argv = [*flags, "--global-batch-size", str(mbs * micro_batches), "--train-iters", str(args.train_iters),
                "--lr", "3e-4", "--lr-warmup-iters", "2", "--eval-iters", "0", "--no-progress", "--bf16"]
        try:
            cfg, settings, margs, model_kwargs = prepare(argv)
            trainer = Trainer(cfg, settings, margs, model_kwargs)
            try:
                summary = trainer.train()
            finally:
                trainer.close()
                del trainer
                gc.collect()  # the optimizer's state goes before the counting model is built

            runtime.initialize(seed=0)
            try:
                flops = microbatch_flops(cfg, seq, mbs, dict(
                    backend=model_kwargs["backend"], bf16=True, moe_grouped_gemm=model_kwargs["moe_grouped_gemm"]),
                    args.device) * micro_batches
            finally:
                runtime.shutdown()
            step_s = mbs * micro_batches * seq / summary["tokens_per_s"]
            achieved = flops / step_s / 1e12
            out[name] = {"tokens_per_s": summary["tokens_per_s"], "step_ms": step_s * 1e3,
                         "tflop_per_step": flops / 1e12, "achieved_tflops": achieved,
                         "mfu_vs_measured_peak": achieved / peak, "mfu_vs_h200_spec": achieved / H200_BF16_DENSE_TFLOPS,
                         "final_lm_loss": summary["final_lm_loss"]}
        except Exception as exc:  # noqa: BLE001  (one run's failure is a result too)
            out[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2000:]}
        print(f"mfu {name}: {json.dumps(out[name])[:400]}", flush=True)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke", action="store_true", help="toy sizes and one repeat: checks every path runs")
    ap.add_argument("--train-iters", type=int, default=30)
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_speed_check: no CUDA device; nothing measured", file=sys.stderr)
        result = {"status": "skipped", "reason": "no CUDA device"}
        print(json.dumps(result))
        return result
    if args.smoke:
        args.train_iters = 3
    from megatron_dsv3.notices import quiet_third_party

    quiet_third_party()
    result = {"status": "ran", "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "torch": torch.__version__}
    bench = SimpleNamespace(device=args.device, repeats=1 if args.smoke else 3, prompt_len=16 if args.smoke else 128,
                            new_tokens=8 if args.smoke else 128, train_batch=2 if args.smoke else 4,
                            train_seq=32 if args.smoke else 128)
    sections = {"decode": speed.decode_section, "train": speed.train_section, "mfu": lambda _: mfu_section(args)}
    for name, section in sections.items():
        try:
            result[name] = section(bench)
        except Exception as exc:  # noqa: BLE001
            result[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2000:]}
            print(f"{name}: {result[name]['error']}", file=sys.stderr, flush=True)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
