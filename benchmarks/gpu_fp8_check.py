"""Prepared GPU check of the FP8 paths (run it on one Hopper GPU; a few minutes on an H200).

    python benchmarks/gpu_fp8_check.py [--tokens 4096] [--iters 10]

1. quantizer: codes and scale_inv computed on the GPU equal the CPU ones bit for bit, and the scales handed
   to torch's block-scaled matmul (native.prepare_scale) carry exactly those values;
2. native FP8 GEMM (torch.nn.functional.scaled_mm, and torch._scaled_mm) against our emulation (fp8_gemm,
   exact FP32 promotion every 128) of the same quantized operands, for the fprop (1x128 x 128x128) and wgrad
   (1x128 x 1x128) forms: relative error, and 1 - 2*sum(xy)/sum(x^2+y^2) against BF16 (bar: < 1e-3);
3. fp8_linear with FP8Config(gemm='native') vs the emulated one: output and both gradients;
4. step time (forward + backward) of a DeepSeek-V3 routed-expert MLP (7168 -> 2x2048 -> 7168, SwiGLU) and
   the MLA projections, native FP8 vs BF16, and Transformer Engine's Float8BlockScaling when TE imports.

Prints one JSON line (also on partial failure: each section records its own error). Without CUDA it prints
{"status": "skipped", ...} with a message and exits 0.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback

import torch


def _bf16_gap(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    return float(1 - 2 * (x * y).sum() / (x * x + y * y).sum())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def check_quantizer(dev):
    from megatron_dsv3.fp8 import quantize_blockwise
    from megatron_dsv3.fp8.native import pad_operand, prepare_scale

    out = {}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 3000, generator=g) * torch.exp(torch.randn(1000, 1, generator=g) * 2)
    for block in ((1, 128), (128, 128)):
        for dtype in (torch.float32, torch.bfloat16):
            xc = x.to(dtype)
            qc, sc = quantize_blockwise(xc, block)
            qg, sg = quantize_blockwise(xc.to(dev), block)
            key = f"{block[0]}x{block[1]}_{str(dtype).split('.')[-1]}"
            out[key] = bool(torch.equal(qc.view(torch.uint8), qg.cpu().view(torch.uint8))
                            and torch.equal(sc, sg.cpu()))
    a = pad_operand(x[:, :1000].to(dev))
    _, s1 = quantize_blockwise(a, (1, 128))
    _, s2 = quantize_blockwise(a, (128, 128))
    pa = prepare_scale(s1, (1, 128), "a")
    pb = prepare_scale(s2, (128, 128), "b")
    out["prepared_scales_equal"] = bool(torch.equal(pa, s1) and torch.equal(pb[: s2.shape[1]], s2.t()))
    out["ok"] = all(out.values())
    return out


def check_gemm(dev):
    import torch.nn.functional as F

    from megatron_dsv3.fp8 import fp8_gemm, quantize_blockwise
    from megatron_dsv3.fp8.native import native_scaled_mm

    out = {}
    g = torch.Generator(device=dev).manual_seed(1)
    m, k, n = 1024, 4096, 2048
    a = torch.randn(m, k, device=dev, generator=g)
    b = torch.randn(n, k, device=dev, generator=g) * 0.02
    ref_bf16 = (a.bfloat16() @ b.bfloat16().t()).float()
    apis = [api for api, ok in (("v2", hasattr(F, "scaled_mm")), ("v1", hasattr(torch, "_scaled_mm"))) if ok]
    out["apis"] = apis
    for form, b_block in (("fprop_1x128_128x128", (128, 128)), ("wgrad_1x128_1x128", (1, 128))):
        aq, asi = quantize_blockwise(a, (1, 128))
        bq, bsi = quantize_blockwise(b, b_block)
        emu = fp8_gemm(aq, asi, (1, 128), bq, bsi, b_block, promotion_interval=128)
        res = {"emulated_vs_bf16": _bf16_gap(emu, ref_bf16)}
        for api in apis:
            try:
                nat = native_scaled_mm(aq, asi, (1, 128), bq, bsi, b_block, out_dtype=torch.bfloat16, api=api)
                torch.cuda.synchronize()
                res[api] = {"rel_err_vs_emulated": _rel(nat.float(), emu),
                            "emulated_bf16_rounded_rel_err": _rel(emu.bfloat16().float(), emu),
                            "one_minus_cos_vs_bf16": _bf16_gap(nat.float(), ref_bf16)}
                res[api]["pass"] = bool(res[api]["one_minus_cos_vs_bf16"] < 1e-3
                                        and res[api]["rel_err_vs_emulated"] < 1e-2)
            except Exception as err:  # record and continue: this is what the check is for
                res[api] = {"error": f"{type(err).__name__}: {str(err)[:400]}"}
        out[form] = res
    return out


def check_linear(dev):
    from megatron_dsv3.fp8 import FP8Config, fp8_linear

    g = torch.Generator(device=dev).manual_seed(2)
    x = torch.randn(512, 1024, device=dev, generator=g)
    w = torch.randn(768, 1024, device=dev, generator=g) * 0.03
    dy = torch.randn(512, 768, device=dev, generator=g)
    res = {}
    for gemm in ("emulated", "native"):
        xi, wi = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        y = fp8_linear(xi, wi, config=FP8Config(gemm=gemm))
        y.backward(dy)
        res[gemm] = (y.detach(), xi.grad, wi.grad)
    (ye, dxe, dwe), (yn, dxn, dwn) = res["emulated"], res["native"]
    out = {"y_rel": _rel(yn, ye), "dx_rel": _rel(dxn, dxe), "dw_rel": _rel(dwn, dwe)}
    out["pass"] = all(v < 1e-2 for v in out.values())
    return out


def _time(fn, iters):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters * 1e3


def _shapes():
    # name: list of (in, out) linears applied in sequence (DeepSeek-V3: hidden 7168, 128 heads).
    return {
        "expert_mlp": [(7168, 4096), (2048, 7168)],  # fc1 gate+up fused, SwiGLU, fc2
        "mla_projections": [(7168, 1536), (1536, 128 * 192), (7168, 576), (512, 128 * 256), (128 * 128, 7168)],
    }


def _make_step(shapes, tokens, dev, linear):
    g = torch.Generator(device=dev).manual_seed(3)
    ws = [(torch.randn(o, i, device=dev, generator=g) * i ** -0.5).requires_grad_(True) for i, o in shapes]
    xs = [torch.randn(tokens, i, device=dev, generator=g).bfloat16().float().requires_grad_(True)
          for i, _ in shapes]
    expert = len(shapes) == 2

    def step():
        if expert:
            h = linear(xs[0], ws[0])
            gate, up = h.chunk(2, dim=-1)
            y = linear(torch.nn.functional.silu(gate) * up, ws[1])
            loss = y.float().square().mean()
        else:
            loss = sum(linear(x, w).float().square().mean() for x, w in zip(xs, ws))
        loss.backward()

    return step


def check_speed(dev, tokens, iters):
    from megatron_dsv3.fp8 import FP8Config, fp8_linear

    native = FP8Config(gemm="native")
    out = {"tokens": tokens}
    for name, shapes in _shapes().items():
        res = {}
        res["bf16_ms"] = _time(_make_step(shapes, tokens, dev,
                                          lambda x, w: torch.nn.functional.linear(x.bfloat16(), w.bfloat16())),
                               iters)
        try:
            res["fp8_native_ms"] = _time(_make_step(shapes, tokens, dev,
                                                    lambda x, w: fp8_linear(x, w, config=native)), iters)
            res["fp8_over_bf16"] = res["fp8_native_ms"] / res["bf16_ms"]
        except Exception as err:
            res["fp8_native_error"] = f"{type(err).__name__}: {str(err)[:300]}"
        out[name] = res
    return out


def check_te(dev, tokens, iters):
    try:
        import transformer_engine.pytorch as te
        from transformer_engine.common.recipe import Float8BlockScaling
    except Exception as err:
        return {"available": False, "reason": f"{type(err).__name__}: {str(err)[:200]}"}
    out = {"available": True}
    recipe = Float8BlockScaling()
    for name, shapes in _shapes().items():
        try:
            layers = [te.Linear(i, o, bias=False, params_dtype=torch.bfloat16, device=dev) for i, o in shapes]
            xs = [torch.randn(tokens, i, device=dev, dtype=torch.bfloat16, requires_grad=True) for i, _ in shapes]

            def run(fp8):
                def step():
                    with te.fp8_autocast(enabled=fp8, fp8_recipe=recipe):
                        loss = sum(layer(x).float().square().mean() for layer, x in zip(layers, xs))
                    loss.backward()
                return step

            bf16, fp8 = _time(run(False), iters), _time(run(True), iters)
            out[name] = {"bf16_ms": bf16, "fp8_ms": fp8, "fp8_over_bf16": fp8 / bf16}
        except Exception as err:
            out[name] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        msg = "gpu_fp8_check: no CUDA device here; run it on a Hopper GPU (nothing was checked)"
        print(msg, file=sys.stderr)
        print(json.dumps({"status": "skipped", "reason": "no CUDA device", "torch": torch.__version__}))
        return 0
    dev = torch.device("cuda")
    from megatron_dsv3.fp8.native import native_available

    result = {"status": "ran", "torch": torch.__version__, "device": torch.cuda.get_device_name(),
              "capability": list(torch.cuda.get_device_capability()), "native_available": native_available()}
    t0 = time.perf_counter()
    for name, fn in (("quantizer", lambda: check_quantizer(dev)), ("gemm", lambda: check_gemm(dev)),
                     ("linear", lambda: check_linear(dev)),
                     ("speed", lambda: check_speed(dev, args.tokens, args.iters)),
                     ("te", lambda: check_te(dev, args.tokens, args.iters))):
        s = time.perf_counter()
        try:
            result[name] = fn()
        except Exception as err:
            result[name] = {"error": f"{type(err).__name__}: {str(err)[:400]}",
                            "where": traceback.format_exc().splitlines()[-3:]}
        result[name + "_s"] = round(time.perf_counter() - s, 2)
        print(f"gpu_fp8_check: {name} done in {result[name + '_s']} s", file=sys.stderr, flush=True)
    result["total_s"] = round(time.perf_counter() - t0, 2)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    import os

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    raise SystemExit(main())
