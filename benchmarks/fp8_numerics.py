"""FP8 numerics study (CPU): quantization error by scaling granularity, FP32 promotion in the GEMM, and the
tiny model trained with emulated block-wise FP8 against the high-precision baseline and a no-scaling control.

    OMP_NUM_THREADS=1 python benchmarks/fp8_numerics.py [--steps 300] [--lr 3e-4 --min-lr 1e-4]
                                                        [--plot docs/fp8_numerics.png]

Prints one JSON line per section and a summary with ratios; writes the plot. All three runs use Megatron's
`--bf16` (BF16 weights and compute, FP32 main weights, weight gradients accumulated in FP32 as on GPUs); the
FP8 runs replace the linears' GEMMs with the emulated FP8 ones.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megatron_dsv3.fp8 import dequantize_blockwise, fp8_gemm, quantize_blockwise  # noqa: E402

COMMON = ["--preset", "tiny", "--seq-length", "64", "--micro-batch-size", "8", "--lr-decay-style", "cosine",
          "--lr-warmup-iters", "20", "--weight-decay", "0.1", "--adam-beta2", "0.95", "--no-progress", "--bf16"]
VARIANTS = {"baseline_bf16": [], "fp8_blockwise": ["--fp8-recipe", "blockwise"],
            "fp8_no_scaling": ["--fp8-recipe", "blockwise", "--fp8-no-scaling-control"]}


def quantization_error(n: int = 4096) -> dict:
    """Relative error of quantize-dequantize for per-tensor, 1x128 and 128x128 scaling."""
    g = torch.Generator().manual_seed(0)
    gauss = torch.randn(n, n, generator=g)
    skewed = torch.randn(n, n, generator=g) * torch.exp(2.0 * torch.randn(n, 1, generator=g))
    outliers = torch.randperm(n, generator=g)[:8]
    skewed[:, outliers] *= 100.0
    bulk = torch.ones(n, dtype=torch.bool)
    bulk[outliers] = False
    out = {}
    for data_name, x, cols in (("gaussian", gauss, slice(None)), ("token_scaled_outliers", skewed, bulk)):
        res = {}
        for name, block in (("per_tensor", (n, n)), ("tile_1x128", (1, 128)), ("block_128x128", (128, 128))):
            q, s = quantize_blockwise(x, block)
            deq = dequantize_blockwise(q, s, block)
            rel = ((deq - x).abs() / x.abs().clamp_min(1e-30))[:, cols]
            res[name] = {"median_rel": rel.median().item(), "mean_rel": rel.mean().item(),
                         "flushed_to_zero": float((deq[:, cols] == 0).float().mean())}
        out[data_name] = res
    return out


def promotion_error(k: int = 4096, m: int = 256, bits: int = 13) -> dict:
    """Mean relative GEMM error (vs FP64 of the dequantized operands) on uniform[0,1) inputs, a `bits`-bit
    accumulator, with and without FP32 promotion every 128 products."""
    g = torch.Generator().manual_seed(7)
    a, b = torch.rand(m, k, generator=g), torch.rand(m, k, generator=g)
    aq, asi = quantize_blockwise(a, (1, 128))
    bq, bsi = quantize_blockwise(b, (128, 128))
    ref = dequantize_blockwise(aq, asi, (1, 128)).double() @ dequantize_blockwise(bq, bsi, (128, 128)).double().T
    res = {"k": k, "accumulator_mantissa_bits": bits}
    for name, interval in (("promote_every_128", 128), ("no_promotion", None)):
        out = fp8_gemm(aq, asi, (1, 128), bq, bsi, (128, 128), interval, bits)
        res[name] = ((out.double() - ref).abs() / ref).mean().item()
    res["ratio_no_promotion_over_promoted"] = res["no_promotion"] / res["promote_every_128"]
    return res


def _train(extra, steps, lr_flags):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "megatron_dsv3.training.pretrain", *COMMON, "--train-iters", str(steps), *lr_flags, *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    summary["wall_s"] = time.perf_counter() - t0
    return summary


def training(steps: int, lr: float = 3e-4, min_lr: float = 1e-4) -> dict:
    lr_flags = ["--lr", str(lr), "--min-lr", str(min_lr)]
    with ThreadPoolExecutor(max_workers=3) as pool:
        runs = dict(zip(VARIANTS, pool.map(lambda e: _train(e, steps, lr_flags), VARIANTS.values())))
    base = runs["baseline_bf16"]["lm_losses"]
    res = {"steps": steps, "lr": lr, "min_lr": min_lr, "runs": {}}
    for name, r in runs.items():
        losses = r["lm_losses"]
        rel = [abs(x - y) / y for x, y in zip(losses, base)]
        tail = sum(losses[-20:]) / 20
        res["runs"][name] = {
            "last20_mean_loss": tail,
            "last20_rel_err_vs_baseline": abs(tail - sum(base[-20:]) / 20) / (sum(base[-20:]) / 20),
            "max_step_rel_err": max(rel), "mean_step_rel_err": sum(rel) / len(rel),
            "wall_s": r["wall_s"], "tokens_per_s": r["tokens_per_s"], "lm_losses": losses, "step_rel_err": rel,
        }
    return res


def plot(train: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=80)
    colors = {"baseline_bf16": "k", "fp8_blockwise": "tab:blue", "fp8_no_scaling": "tab:red"}
    for name, r in train["runs"].items():
        ax0.plot(r["lm_losses"], color=colors[name], lw=1, label=name)
        if name != "baseline_bf16":
            ax1.semilogy([max(e, 1e-7) for e in r["step_rel_err"]], color=colors[name], lw=0.8, label=name)
    ax0.set_xlabel("step"), ax0.set_ylabel("LM loss"), ax0.legend(), ax0.set_title("tiny model, same seed and data")
    ax1.axhline(0.0025, color="gray", ls="--", lw=0.8, label="0.25%")
    ax1.set_xlabel("step"), ax1.set_ylabel("|loss - baseline| / baseline"), ax1.legend()
    ax1.set_title("relative loss error per step")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="FP8 numerics study")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--min-lr", type=float, default=1e-4)
    p.add_argument("--plot", default=os.path.join(ROOT, "docs", "fp8_numerics.png"))
    p.add_argument("--json", default=None, help="also write all results (with per-step losses) here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    quant = quantization_error()
    print(json.dumps({"quantization_error": quant}), flush=True)
    promo = promotion_error()
    print(json.dumps({"promotion": promo}), flush=True)
    train = training(args.steps, args.lr, args.min_lr)
    plot(train, args.plot)
    brief = {k: {f: v[f] for f in ("last20_mean_loss", "last20_rel_err_vs_baseline", "max_step_rel_err",
                                    "mean_step_rel_err", "wall_s", "tokens_per_s")}
             for k, v in train["runs"].items()}
    print(json.dumps({"training": brief}), flush=True)
    sk = quant["token_scaled_outliers"]
    summary = {
        "per_tensor_over_1x128_median_rel_err": sk["per_tensor"]["median_rel"] / sk["tile_1x128"]["median_rel"],
        "no_promotion_over_promoted": promo["ratio_no_promotion_over_promoted"],
        "fp8_last20_rel_err": brief["fp8_blockwise"]["last20_rel_err_vs_baseline"],
        "no_scaling_last20_rel_err": brief["fp8_no_scaling"]["last20_rel_err_vs_baseline"],
        "fp8_over_bf16_wall": brief["fp8_blockwise"]["wall_s"] / brief["baseline_bf16"]["wall_s"],
        "plot": args.plot, "total_s": time.perf_counter() - t0,
    }
    print(json.dumps({"summary": summary}), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"quantization_error": quant, "promotion": promo, "training": train, "summary": summary}, f)


if __name__ == "__main__":
    main()
