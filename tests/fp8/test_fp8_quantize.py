"""Block-wise FP8 quantization: bit-exact against a slow float64 loop reference, properties, errors, statistics."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_dsv3.fp8 import dequantize_blockwise, quantize_blockwise
from megatron_dsv3.fp8.quantize import quantize_dequantize_blockwise, round_to_e4m3

F32_MAX = float(np.finfo(np.float32).max)


def ref_quantize(x, block, pow2):
    """Independent oracle: explicit Python loop over blocks, scale by float64 division rounded to float32."""
    xf = x.detach().to(torch.float32).reshape(-1, x.shape[-1]).numpy()
    rows, cols = xf.shape
    b0, b1 = block
    nb0, nb1 = -(-rows // b0), -(-cols // b1)
    scaled = np.zeros((rows, cols), dtype=np.float32)
    scale_inv = np.zeros((nb0, nb1), dtype=np.float32)
    for i in range(nb0):
        for j in range(nb1):
            blk = xf[i * b0:(i + 1) * b0, j * b1:(j + 1) * b1].astype(np.float64)
            amax = float(np.abs(blk).max())
            if amax == 0.0:
                s = 1.0
            else:
                q = 448.0 / amax  # float64 quotient of two float32 values ...
                s = float(np.float32(q)) if q <= F32_MAX else math.inf  # ... rounded once to float32
                if math.isinf(s):
                    s = F32_MAX
                if pow2:
                    _, e = math.frexp(s)  # s = m * 2**e with m in [0.5, 1)
                    s = math.ldexp(1.0, e - 1)
            # float32 * float32 is exact in float64, so one rounding to float32 = the FP32 product.
            prod = (blk * s).astype(np.float32)
            scaled[i * b0:(i + 1) * b0, j * b1:(j + 1) * b1] = np.clip(prod, -448.0, 448.0)
            scale_inv[i, j] = np.float32(1.0 / s)
    codes = torch.from_numpy(scaled).to(torch.float8_e4m3fn).reshape(x.shape)
    return codes, torch.from_numpy(scale_inv)


def assert_bit_exact(x, block, pow2):
    data, sinv = quantize_blockwise(x, block, power_2_scale=pow2)
    rdata, rsinv = ref_quantize(x, block, pow2)
    assert data.dtype == torch.float8_e4m3fn and data.shape == x.shape
    assert sinv.dtype == torch.float32 and sinv.shape == rsinv.shape
    assert torch.equal(sinv.view(torch.int32), rsinv.view(torch.int32))
    assert torch.equal(data.view(torch.uint8), rdata.view(torch.uint8))


def make_input(shape, seed, dtype):
    """Row-wise log-normal magnitudes, a zero block, and dtype extremes planted in distinct regions."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = shape
    x = torch.randn(rows, cols, generator=g) * torch.exp(2 * torch.randn(rows, 1, generator=g))
    if rows >= 3 and cols >= 200:
        x[0, :128] = 0.0  # an all-zero 1x128 tile
        x[1, :3] = torch.tensor([448.0, -447.9, 449.0])
        x[1, 130:133] = torch.tensor([1e30, -3e38, 1.0])
        x[2, :3] = torch.tensor([1e-40, -3e-41, 1e-45])  # FP32 subnormals: the scale overflows to inf
        x[2, 140:143] = torch.tensor([1e-30, 2e-38, 0.0])
    return x.to(dtype)


@pytest.mark.parametrize("shape", [(130, 257), (1, 5), (300, 129), (256, 256)])
@pytest.mark.parametrize("block", [(1, 128), (128, 128)])
@pytest.mark.parametrize("pow2", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bit_exact_vs_reference(shape, block, pow2, dtype):
    x = make_input(shape, seed=hash((shape, block)) % 1000, dtype=dtype)
    assert_bit_exact(x, block, pow2)


@pytest.mark.parametrize("pow2", [True, False])
def test_bit_exact_extremes_and_odd_blocks(pow2):
    x = torch.tensor([[0.0, -0.0, 448.0, -448.0, 1e-45],
                      [1e30, 1e-40, 3.4e38, -1e-38, 7.0],
                      [0.0, 0.0, 0.0, 0.0, 0.0]])
    for block in [(1, 5), (1, 2), (2, 3), (3, 5), (1, 1), (7, 9)]:
        assert_bit_exact(x, block, pow2)
    assert_bit_exact(torch.randn(4, 6, 37), (3, 16), pow2)  # N-D input, flattened over leading dims
    # the subnormal-only block gets the clamped scale: 2^127 or FLT_MAX
    _, sinv = quantize_blockwise(torch.tensor([[1e-40, 2e-41]]), (1, 2), power_2_scale=pow2)
    expected = 2.0 ** -127 if pow2 else float(np.float32(1.0 / F32_MAX))
    assert sinv.item() == expected


def test_fp32_rounding_to_e4m3_is_the_cast_bit_for_bit():
    """Every E4M3 value, every midpoint between neighbours and one FP32 step either side of it (ties to even),
    signed zeros, FP32 denormals, and random values over the whole range."""
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    codes = codes[torch.isfinite(codes)]
    values = codes.unique().double()
    mids = ((values[1:] + values[:-1]) / 2).float()
    g = torch.Generator().manual_seed(3)
    v = torch.cat([codes, mids, torch.nextafter(mids, torch.tensor(np.inf)), torch.nextafter(mids, torch.tensor(-np.inf)),
                   torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-40, -3e-39, 448.0, -448.0]),
                   (torch.rand(200_000, generator=g) * 2 - 1) * 448,
                   torch.randn(200_000, generator=g) * torch.exp(4 * torch.randn(200_000, generator=g))]).clamp(-448, 448)
    expected = v.to(torch.float8_e4m3fn).float()
    assert torch.equal(round_to_e4m3(v).view(torch.int32), expected.view(torch.int32))


@pytest.mark.parametrize("shape", [(130, 257), (1, 5), (300, 129), (256, 256)])
@pytest.mark.parametrize("block", [(1, 128), (128, 128), (3, 5)])
@pytest.mark.parametrize("pow2", [True, False])
def test_quantize_dequantize_is_the_two_steps_bit_for_bit(shape, block, pow2):
    x = make_input(shape, seed=7, dtype=torch.float32)
    data, sinv = quantize_blockwise(x, block, power_2_scale=pow2)
    two_steps = dequantize_blockwise(data, sinv, block)
    assert torch.equal(quantize_dequantize_blockwise(x, block, pow2).view(torch.int32), two_steps.view(torch.int32))
    with pytest.raises(ValueError, match="'act'.*non-finite"):
        quantize_dequantize_blockwise(torch.tensor([[1.0, float("nan")]]), block, pow2, name="act")


@pytest.mark.parametrize("block", [(1, 128), (128, 128)])
def test_strided_input_quantizes_as_its_contiguous_copy(block):
    """A transposed weight (W^T for dgrad) is a strided view: same codes, scales and FP32 operands as its copy."""
    wt = make_input((256, 384), seed=5, dtype=torch.float32).t()
    data, sinv = quantize_blockwise(wt, block)
    assert_bit_exact(wt.contiguous(), block, True)
    rdata, rsinv = quantize_blockwise(wt.contiguous(), block)
    assert torch.equal(data.view(torch.uint8), rdata.view(torch.uint8)) and torch.equal(sinv, rsinv)
    assert torch.equal(quantize_dequantize_blockwise(wt, block), dequantize_blockwise(rdata, rsinv, block))


def test_zero_block_has_unit_scale_and_zero_codes():
    data, sinv = quantize_blockwise(torch.zeros(3, 300), (1, 128))
    assert torch.all(sinv == 1.0) and sinv.shape == (3, 3)
    assert torch.all(data.view(torch.uint8) == 0)


def test_scalar_division_trap():
    """``448.0 / t`` is reciprocal-then-multiply in torch (two roundings); the quantizer must not use it."""
    t = torch.linspace(0.5, 40.0, 20011, dtype=torch.float32)
    correct = torch.from_numpy((448.0 / t.double().numpy()).astype(np.float32))
    trap = 448.0 / t
    bad = (trap != correct).nonzero().flatten()
    assert bad.numel() > 0, "expected the scalar form to misround somewhere"
    amax = t[bad[:50]]
    # non-power-of-2 scales expose the difference: one block per amax value
    x = torch.stack([amax, torch.zeros_like(amax)], dim=1)
    _, sinv = quantize_blockwise(x, (1, 2), power_2_scale=False)
    good_scale = torch.from_numpy((448.0 / amax.double().numpy()).astype(np.float32))
    want = torch.from_numpy((1.0 / good_scale.double().numpy()).astype(np.float32))
    wrong = torch.from_numpy((1.0 / trap[bad[:50]].double().numpy()).astype(np.float32))
    assert torch.equal(sinv.flatten().view(torch.int32), want.view(torch.int32))
    assert not torch.equal(sinv.flatten().view(torch.int32), wrong.view(torch.int32))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_raises_with_name(bad):
    x = torch.randn(4, 256)
    x[1, 7] = bad
    x[3, 200] = bad
    with pytest.raises(ValueError, match=r"activations.*2 non-finite"):
        quantize_blockwise(x, (1, 128), name="activations")
    with pytest.raises(ValueError, match="'x'"):
        quantize_blockwise(x.bfloat16(), (128, 128))


@pytest.mark.parametrize("block", [(0, 128), (128,), (1, 2, 3), (1.0, 128), (-1, 4), "ab", None, (True, 4)])
def test_bad_block_shape(block):
    with pytest.raises(ValueError, match="block_shape"):
        quantize_blockwise(torch.randn(4, 8), block)


def test_bad_inputs_and_dequant_validation():
    with pytest.raises(ValueError, match="2 dims"):
        quantize_blockwise(torch.randn(8), (1, 4))
    with pytest.raises(ValueError, match="floating"):
        quantize_blockwise(torch.ones(4, 4, dtype=torch.int32), (1, 4))
    data, sinv = quantize_blockwise(torch.randn(130, 257), (128, 128))
    assert sinv.shape == (2, 3)
    with pytest.raises(ValueError, match=r"scale_inv has shape \(2, 2\).*needs \(2, 3\)"):
        dequantize_blockwise(data, sinv[:, :2], (128, 128))
    with pytest.raises(ValueError, match="2-D"):
        dequantize_blockwise(data, sinv.flatten(), (128, 128))


def test_dequantize_matches_manual_and_checkpoint_semantics():
    """A DeepSeek-V3 style (weight, weight_scale_inv) pair dequantizes as block * scale_inv, partial edges included."""
    g = torch.Generator().manual_seed(3)
    w8 = (torch.randn(300, 200, generator=g) * 50).clamp(-448, 448).to(torch.float8_e4m3fn)
    wsi = torch.rand(3, 2, generator=g) * 1e-3
    out = dequantize_blockwise(w8, wsi, (128, 128), dtype=torch.bfloat16)
    ref = np.zeros((300, 200), dtype=np.float32)
    codes = w8.float().numpy()
    for i in range(3):
        for j in range(2):
            ref[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = codes[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] * wsi[i, j].item()
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, torch.from_numpy(ref).bfloat16())


@st.composite
def quant_cases(draw):
    rows = draw(st.integers(1, 40))
    cols = draw(st.integers(1, 300))
    block = draw(st.sampled_from([(1, 128), (128, 128), (1, 16), (4, 32), (rows, cols)]))
    seed = draw(st.integers(0, 2**31 - 1))
    spread = draw(st.floats(0.0, 8.0))
    center = draw(st.floats(-30.0, 30.0))
    specials = draw(st.lists(st.floats(-2.0**127, 2.0**127, width=32), max_size=6))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * torch.exp(center + spread * torch.randn(rows, cols, generator=g))
    x = torch.nan_to_num(x, posinf=3e38, neginf=-3e38)
    for v in specials:
        x[draw(st.integers(0, rows - 1)), draw(st.integers(0, cols - 1))] = v
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    return x.to(dtype), block


@settings(max_examples=60, deadline=None)
@given(quant_cases(), st.booleans())
def test_properties(case, pow2):
    x, block = case
    data, sinv = quantize_blockwise(x, block, power_2_scale=pow2)
    codes = data.float()
    assert torch.isfinite(codes).all() and codes.abs().max() <= 448.0
    b0, b1 = block
    xf = x.float()
    deq = dequantize_blockwise(data, sinv, block)
    for i in range(sinv.shape[0]):
        for j in range(sinv.shape[1]):
            sl = (slice(i * b0, (i + 1) * b0), slice(j * b1, (j + 1) * b1))
            c, xb, s_inv = codes[sl], xf[sl], sinv[i, j].item()
            if xb.abs().max() == 0:
                assert s_inv == 1.0 and (c == 0).all()
                continue
            m = c.abs().max().item()
            if pow2:
                assert math.frexp(s_inv)[0] == 0.5  # exactly a power of two
                if s_inv > 2.0 ** -127:  # not the clamped-scale case
                    # the scaled amax is in (224, 448]; E4M3 rounding can then bring it down to exactly 224
                    assert 224.0 < xb.abs().max().item() / s_inv <= 448.0
                    assert 224.0 <= m <= 448.0
            elif s_inv > 1.0 / F32_MAX * 1.01:
                assert m == 448.0
            # elements landing in E4M3's normal range keep 3 mantissa bits: error <= 2^-4 relative
            normal = (xb.abs() / s_inv) >= 2.0 ** -6
            err = (deq[sl] - xb).abs()
            assert (err[normal] <= 2.0 ** -4 * xb.abs()[normal]).all()


def test_tiles_beat_per_tensor_on_outliers():
    """Token scales spread log-normally plus x100 outlier channels: 1x128 tiles stay accurate, one scale does not."""
    g = torch.Generator().manual_seed(0)
    n = 4096
    x = torch.randn(n, n, generator=g)
    x *= torch.exp(2.0 * torch.randn(n, 1, generator=g))
    outliers = torch.randperm(n, generator=g)[:8]
    x[:, outliers] *= 100.0
    bulk = torch.ones(n, dtype=torch.bool)
    bulk[outliers] = False

    def bulk_rel_err(block):
        data, sinv = quantize_blockwise(x, block)
        deq = dequantize_blockwise(data, sinv, block)
        rel = ((deq - x).abs() / x.abs())[:, bulk]
        return rel.median().item(), rel.mean().item()

    tile_median, tile_mean = bulk_rel_err((1, 128))
    tensor_median, _ = bulk_rel_err((n, n))
    assert tile_median < 0.03 and tile_mean < 0.03
    assert tensor_median > 0.15
