"""Emulated FP8 GEMM: exact path vs FP64, limited-precision path vs a scalar loop, and the value of promotion."""
import math
import time

import numpy as np
import pytest
import torch

from megatron_dsv3.fp8 import fp8_gemm, fp8_matmul, quantize_blockwise, round_mantissa_


def deq64(data, scale_inv, block):
    """Dequantize in float64 with numpy's kron as the block broadcast (independent of the package)."""
    rows, cols = data.shape
    s = np.kron(scale_inv.double().numpy(), np.ones(block))[:rows, :cols]
    return torch.from_numpy(data.double().numpy() * s)


def round_bits(v, bits):
    """Round a Python float to ``bits`` explicit mantissa bits, ties to even (Python's round is half-even)."""
    if v == 0.0:
        return v
    m, e = math.frexp(v)
    return math.ldexp(round(m * 2.0 ** (bits + 1)), e - bits - 1)


def quantized(shape_a, shape_b, seed, a_block=(1, 128), b_block=(128, 128), uniform=False):
    g = torch.Generator().manual_seed(seed)
    draw = (lambda s: torch.rand(s, generator=g)) if uniform else (lambda s: torch.randn(s, generator=g))
    a, b = draw(shape_a), draw(shape_b)
    return quantize_blockwise(a, a_block) + quantize_blockwise(b, b_block)


@pytest.mark.parametrize("m,n,k", [(70, 200, 300), (1, 5, 4096), (129, 128, 256)])
@pytest.mark.parametrize("interval", [128, 50, None])
def test_exact_accumulation_matches_fp64(m, n, k, interval):
    aq, asi, bq, bsi = quantized((m, k), (n, k), seed=m + n + k)
    out = fp8_gemm(aq, asi, (1, 128), bq, bsi, (128, 128), promotion_interval=interval)
    a, b = deq64(aq, asi, (1, 128)), deq64(bq, bsi, (128, 128))
    ref = a @ b.T
    bound = a.abs() @ b.abs().T  # scale of the sum, robust to cancellation
    assert out.dtype == torch.float32 and out.shape == (m, n)
    assert ((out.double() - ref).abs() <= 1e-5 * bound).all()


def test_round_mantissa_matches_scalar_rounding():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4000, generator=g) * torch.exp(10 * torch.randn(4000, generator=g))
    ties = torch.tensor([1.0 + 2.0 ** -14, 1.0 + 3 * 2.0 ** -14, -(1.0 + 2.0 ** -14), 3.0 * 2.0 ** -14 + 1.0, 0.0])
    x = torch.cat([x, ties])
    for bits in (13, 7, 1, 22):
        got = round_mantissa_(x.clone(), bits)
        want = torch.tensor([round_bits(v, bits) for v in x.tolist()], dtype=torch.float32)
        assert torch.equal(got, want), bits
    assert torch.equal(round_mantissa_(x.clone(), 23), x)


@pytest.mark.parametrize("interval", [128, 64, None])
@pytest.mark.parametrize("bits", [13, 6])
def test_limited_precision_matches_scalar_loop(interval, bits):
    m, n, k = 3, 4, 300
    aq, asi, bq, bsi = quantized((m, k), (n, k), seed=bits, uniform=True)
    out = fp8_gemm(aq, asi, (1, 128), bq, bsi, (128, 128), interval, bits)
    a, b = deq64(aq, asi, (1, 128)).tolist(), deq64(bq, bsi, (128, 128)).tolist()
    step = k if interval is None else interval
    ref = np.zeros((m, n), dtype=np.float32)
    for i in range(m):
        for j in range(n):
            total = np.float32(0.0)
            for c0 in range(0, k, step):
                acc = 0.0
                for kk in range(c0, min(k, c0 + step)):
                    acc = round_bits(float(np.float32(acc + a[i][kk] * b[j][kk])), bits)
                total = np.float32(total + np.float32(acc))
            ref[i, j] = total
    assert torch.equal(out, torch.from_numpy(ref))


def test_promotion_reduces_error_tenfold():
    """Uniform [0,1) inputs at K=4096 with a 14-bit accumulator: promoting every 128 adds beats never promoting."""
    m = n = 256
    aq, asi, bq, bsi = quantized((m, 4096), (n, 4096), seed=7, uniform=True)
    ref = deq64(aq, asi, (1, 128)) @ deq64(bq, bsi, (128, 128)).T
    start = time.perf_counter()
    promoted = fp8_gemm(aq, asi, (1, 128), bq, bsi, (128, 128), 128, 13)
    elapsed = time.perf_counter() - start
    unpromoted = fp8_gemm(aq, asi, (1, 128), bq, bsi, (128, 128), None, 13)
    err_p = ((promoted.double() - ref).abs() / ref).mean().item()
    err_u = ((unpromoted.double() - ref).abs() / ref).mean().item()
    assert err_u > 10 * err_p, (err_u, err_p)
    assert err_u > 1e-4  # the unpromoted accumulator really is lossy
    assert elapsed < 10.0


def test_fp8_matmul_shapes_dtype_and_accuracy():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 256, generator=g).bfloat16()
    w = torch.randn(96, 256, generator=g)
    y = fp8_matmul(x, w)
    assert y.shape == (2, 3, 96) and y.dtype == torch.bfloat16
    xq, xs = quantize_blockwise(x.reshape(6, 256), (1, 128))
    wq, ws = quantize_blockwise(w, (128, 128))
    ref = deq64(xq, xs, (1, 128)) @ deq64(wq, ws, (128, 128)).T
    assert torch.equal(y.reshape(6, 96), ref.float().bfloat16())
    assert fp8_matmul(x, w, out_dtype=torch.float32).dtype == torch.float32


def test_gemm_argument_errors():
    aq, asi, bq, bsi = quantized((4, 256), (8, 256), seed=0)
    with pytest.raises(ValueError, match="reduction dims"):
        fp8_gemm(aq, asi, (1, 128), bq[:, :128], bsi[:, :1], (128, 128))
    with pytest.raises(ValueError, match="promotion_interval"):
        fp8_gemm(aq, asi, (1, 128), bq, bsi, (128, 128), promotion_interval=0)
    with pytest.raises(ValueError, match="accumulator_mantissa_bits"):
        fp8_gemm(aq, asi, (1, 128), bq, bsi, (128, 128), accumulator_mantissa_bits=30)
    with pytest.raises(ValueError, match="scale_inv has shape"):
        fp8_gemm(aq, asi, (128, 128), bq, bsi, (128, 128))
    with pytest.raises(ValueError, match="K=256"):
        fp8_matmul(torch.randn(3, 100), torch.randn(8, 256))
