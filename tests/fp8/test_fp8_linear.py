"""FP8 linear: forward/backward against float64 oracles built from the same per-GEMM quantizations."""
import dataclasses

import numpy as np
import pytest
import torch

from megatron_dsv3.fp8 import FP8BlockwiseLinearFunction, FP8Config, fp8_linear, quantize_blockwise


def qdq64(t, block, pow2=True):
    """Quantize ``t`` (2-D) with the given blocks and dequantize in float64 (numpy kron broadcast)."""
    data, sinv = quantize_blockwise(t, block, power_2_scale=pow2)
    s = np.kron(sinv.double().numpy(), np.ones(block))[: t.shape[0], : t.shape[1]]
    return torch.from_numpy(data.double().numpy() * s)


def close(got, ref, a_abs_b):
    """Elementwise |got - ref| <= 1e-5 * (|A| @ |B|^T), the natural scale of a dot product."""
    return bool(((got.double() - ref).abs() <= 1e-5 * a_abs_b + 1e-30).all())


def col_gap(got, ref):
    """Worst per-column relative error: column k of dgrad/wgrad belongs to input channel k."""
    return ((got.double() - ref).norm(dim=0) / ref.norm(dim=0)).max().item()


def oracle(x2d, w, dy, wblock=(128, 128), ablock=(1, 128), pow2=True):
    """float64 fprop, dgrad, wgrad, each on its own quantization of the operands of that GEMM."""
    xa, wa = qdq64(x2d, ablock, pow2), qdq64(w, wblock, pow2)
    dya, wta = qdq64(dy, ablock, pow2), qdq64(w.t().contiguous(), wblock, pow2)
    dyta, xta = qdq64(dy.t().contiguous(), ablock, pow2), qdq64(x2d.t().contiguous(), ablock, pow2)
    return {
        "y": (xa @ wa.T, xa.abs() @ wa.abs().T),
        "dx": (dya @ wta.T, dya.abs() @ wta.abs().T),
        "dw": (dyta @ xta.T, dyta.abs() @ xta.abs().T),
    }


def run_linear(x, w, b, config, seed=0):
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    b = None if b is None else b.clone().requires_grad_(True)
    y = fp8_linear(x, w, b, config)
    # log-normal row (token) and column (channel) scales, so that every choice of quantization block matters
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(y.shape, generator=g) * torch.exp(2 * torch.randn(*y.shape[:-1], 1, generator=g))
    dy = (dy * torch.exp(2 * torch.randn(y.shape[-1], generator=g))).to(y.dtype)
    y.backward(dy)
    return x, w, b, y, dy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_grads_match_fp64_oracle(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 100, 300, generator=g) * torch.exp(torch.randn(2, 100, 1, generator=g))).to(dtype)
    w = (torch.randn(200, 300, generator=g) * 0.05).to(dtype)
    b = torch.randn(200, generator=g).to(dtype)
    x, w, b, y, dy = run_linear(x, w, b, FP8Config())
    assert y.shape == (2, 100, 200) and y.dtype == dtype
    assert x.grad.dtype == dtype and w.grad.dtype == dtype and b.grad.dtype == dtype
    ref = oracle(x.detach().reshape(200, 300), w.detach(), dy.reshape(200, 200))
    tol = 1e-5 if dtype == torch.float32 else 2.0 ** -7  # bf16 outputs carry one extra rounding
    y_ref = ref["y"][0] + b.detach().double()
    scale = ref["y"][1] + b.detach().double().abs()
    assert ((y.detach().reshape(200, 200).double() - y_ref).abs() <= tol * scale + tol * y_ref.abs()).all()
    for name, grad, shape in (("dx", x.grad, (200, 300)), ("dw", w.grad, (200, 300))):
        val, mag = ref[name]
        assert ((grad.reshape(shape).double() - val).abs() <= tol * mag + tol * val.abs()).all(), name
    dy64 = dy.reshape(200, 200).double()
    assert ((b.grad.double() - dy64.sum(0)).abs() <= tol * dy64.abs().sum(0)).all()


def spread(shape, g):
    """Gaussian entries times log-normal row and column scales (wide dynamic range in both directions)."""
    return torch.randn(shape, generator=g) * torch.exp(2 * torch.randn(shape[0], 1, generator=g)) * torch.exp(
        2 * torch.randn(shape[1], generator=g)
    )


@pytest.mark.parametrize("pow2", [True, False])
@pytest.mark.parametrize("wblock", [(128, 128), (32, 64)])
def test_fp32_grads_are_tight(pow2, wblock):
    g = torch.Generator().manual_seed(1)
    x, w = spread((260, 384), g), spread((130, 384), g)
    cfg = FP8Config(promotion_interval=None, power_2_scale=pow2, weight_block=wblock)
    x, w, _, y, dy = run_linear(x, w, None, cfg)
    ref = oracle(x.detach(), w.detach(), dy, wblock=wblock, pow2=pow2)
    assert close(y.detach(), *ref["y"])
    assert close(x.grad, *ref["dx"])
    assert close(w.grad, *ref["dw"])


def test_dgrad_requantizes_transposed_weight():
    """With non-square weight blocks, quantizing W^T differs from transposing quantized W; dgrad must use W^T's."""
    g = torch.Generator().manual_seed(2)
    k, n = 256, 256
    w = torch.randn(n, k, generator=g) * torch.exp(3 * torch.randn(1, k, generator=g))  # column scales
    x = torch.randn(64, k, generator=g)
    cfg = FP8Config(weight_block=(1, 128))
    x, w, _, _, dy = run_linear(x, w, None, cfg)
    dya = qdq64(dy, (1, 128))
    requant = dya @ qdq64(w.detach().t().contiguous(), (1, 128)).T
    transposed = dya @ qdq64(w.detach(), (1, 128))
    assert close(x.grad, requant, dya.abs() @ qdq64(w.detach().t().contiguous(), (1, 128)).abs().T)
    gap = lambda a: col_gap(x.grad, a)
    assert gap(requant) < 1e-6 and gap(transposed) > 1e-2


def test_square_weight_blocks_requantize_to_the_transpose():
    """For aligned 128x128 blocks the W^T quantization is exactly the transpose (same blocks, same amax)."""
    w = torch.randn(300, 200) * torch.exp(3 * torch.randn(1, 200))
    d, s = quantize_blockwise(w, (128, 128))
    dt, st = quantize_blockwise(w.t().contiguous(), (128, 128))
    assert torch.equal(d.t().contiguous().view(torch.uint8), dt.view(torch.uint8)) and torch.equal(s.t(), st)


def test_wgrad_requantizes_along_tokens():
    """x with very different channel scales: wgrad uses x^T tiled along tokens, not the fprop tiles along K."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(256, 256, generator=g) * torch.exp(3 * torch.randn(1, 256, generator=g))
    w = torch.randn(128, 256, generator=g)
    x, w, _, _, dy = run_linear(x, w, None, FP8Config())
    dyta = qdq64(dy.t().contiguous(), (1, 128))
    xt = x.detach().t().contiguous()
    right = dyta @ qdq64(xt, (1, 128)).T
    reused = dyta @ qdq64(x.detach(), (1, 128))  # fprop quantization of x, transposed
    gap = lambda a: col_gap(w.grad, a)
    assert gap(right) < 1e-6 and gap(reused) > 1e-2


def test_close_to_high_precision_with_hopper_accumulator():
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(4, 64, 512, generator=g), torch.randn(256, 512, generator=g) * 0.05
    x, w, _, y, dy = run_linear(x, w, None, FP8Config(accumulator_mantissa_bits=13))
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    yr = torch.nn.functional.linear(xr, wr)
    yr.backward(dy.double())
    rel = lambda a, r: ((a.double() - r).norm() / r.norm()).item()
    assert rel(y.detach(), yr.detach()) < 0.08
    assert rel(x.grad, xr.grad) < 0.08 and rel(w.grad, wr.grad) < 0.08


def test_only_requested_grads_and_no_bias():
    x = torch.randn(8, 128)
    w = torch.randn(16, 128, requires_grad=True)
    y = FP8BlockwiseLinearFunction.apply(x, w, None, FP8Config())
    y.sum().backward()
    assert x.grad is None and w.grad is not None and w.grad.shape == w.shape


@pytest.mark.parametrize(
    "field,value",
    [
        ("promotion_interval", 0),
        ("promotion_interval", 1.5),
        ("accumulator_mantissa_bits", 0),
        ("accumulator_mantissa_bits", 24),
        ("power_2_scale", 1),
        ("weight_block", (128,)),
        ("act_block", (1, -128)),
    ],
)
def test_config_validation_names_field(field, value):
    with pytest.raises(ValueError, match=f"FP8Config.{field}"):
        FP8Config(**{field: value})


def test_config_is_frozen_and_normalised():
    cfg = FP8Config(weight_block=[64, 128], promotion_interval=None, accumulator_mantissa_bits=13)
    assert cfg.weight_block == (64, 128)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.power_2_scale = False
    with pytest.raises(ValueError, match="config"):
        fp8_linear(torch.randn(2, 128), torch.randn(4, 128), config={"power_2_scale": True})
    with pytest.raises(ValueError, match="weight"):
        fp8_linear(torch.randn(2, 100), torch.randn(4, 128))
