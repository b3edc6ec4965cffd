"""Emulated Hopper FP8 GEMM: limited-precision accumulation inside K-chunks, promoted to FP32 at chunk ends.

Convention (the "TN" layout of FP8 tensor cores): ``out[m, n] = sum_k A[m, k] * B[n, k]``, i.e. ``A @ B.T``,
with both operands quantized along K, the reduction dim.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .quantize import check_block_shape, dequantize_blockwise, quantize_blockwise

__all__ = ["fp8_gemm", "fp8_matmul", "promoted_gemm", "round_mantissa_"]

# Cap on the (chunks x rows x N) working tensor of the limited-precision path, in elements.
_WORK_ELEMENTS = 1 << 22


def _check_promotion(promotion_interval: Optional[int], accumulator_mantissa_bits: Optional[int]) -> None:
    if promotion_interval is not None and (
        isinstance(promotion_interval, bool) or not isinstance(promotion_interval, int) or promotion_interval <= 0
    ):
        raise ValueError(f"promotion_interval must be a positive int or None, got {promotion_interval!r}")
    if accumulator_mantissa_bits is not None and (
        isinstance(accumulator_mantissa_bits, bool)
        or not isinstance(accumulator_mantissa_bits, int)
        or not 1 <= accumulator_mantissa_bits <= 23
    ):
        raise ValueError(f"accumulator_mantissa_bits must be an int in [1, 23] or None, got {accumulator_mantissa_bits!r}")


def round_mantissa_(t: torch.Tensor, bits: int) -> torch.Tensor:
    """Round an FP32 tensor in place to ``bits`` explicit mantissa bits (round to nearest, ties to even)."""
    drop = 23 - bits
    if drop <= 0:
        return t
    i = t.view(torch.int32)
    # Sign-magnitude layout: adding to the bit pattern moves the magnitude; carries roll into the exponent.
    bias = (i >> drop).bitwise_and_(1).add_((1 << (drop - 1)) - 1)
    i.add_(bias).bitwise_and_(~((1 << drop) - 1))
    return t


def _chunk_view(t: torch.Tensor, chunks: int, size: int) -> torch.Tensor:
    """Zero-pad the K dim of a [R, K] tensor to chunks*size and return it as [size, chunks, R]."""
    pad = chunks * size - t.shape[1]
    if pad:
        t = torch.nn.functional.pad(t, (0, pad))
    return t.view(t.shape[0], chunks, size).permute(2, 1, 0)


def _chunk_sums_exact(a: torch.Tensor, b: torch.Tensor, chunks: int, size: int) -> torch.Tensor:
    """Per-chunk sums of products, exact up to one final rounding to FP32 (FP64 accumulation). Shape [C, M, N]."""
    a3 = _chunk_view(a.double(), chunks, size)  # [P, C, M]
    b3 = _chunk_view(b.double(), chunks, size)  # [P, C, N]
    return torch.einsum("pcm,pcn->cmn", a3, b3).float()


def _chunk_sums_limited(a: torch.Tensor, b: torch.Tensor, chunks: int, size: int, bits: int) -> torch.Tensor:
    """Per-chunk sums accumulated one k at a time in FP32, rounded to ``bits`` mantissa bits after every add.

    Vectorized over chunks, M and N; the sequential loop runs only over the ``size`` positions of a chunk.
    """
    m, n = a.shape[0], b.shape[0]
    a3 = _chunk_view(a, chunks, size)  # [P, C, M]
    b3 = _chunk_view(b, chunks, size)  # [P, C, N]
    out = torch.empty(chunks, m, n, dtype=torch.float32, device=a.device)
    rows = max(1, _WORK_ELEMENTS // max(1, chunks * n))
    for r0 in range(0, m, rows):
        r1 = min(m, r0 + rows)
        acc = torch.zeros(chunks, r1 - r0, n, dtype=torch.float32, device=a.device)
        for k in range(size):
            # Products of FP8-dequantised values (4-bit significands, power-of-2 scales) are exact in FP32.
            acc.addcmul_(a3[k, :, r0:r1, None], b3[k, :, None, :])
            round_mantissa_(acc, bits)
        out[:, r0:r1] = acc
    return out


def fp8_gemm(
    a_data: torch.Tensor,
    a_scale_inv: torch.Tensor,
    a_block: Sequence[int],
    b_data: torch.Tensor,
    b_scale_inv: torch.Tensor,
    b_block: Sequence[int],
    promotion_interval: Optional[int] = 128,
    accumulator_mantissa_bits: Optional[int] = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Emulate a Hopper FP8 GEMM ``out[m, n] = sum_k A[m, k] * B[n, k]`` on block-quantized A [M, K] and B [N, K].

    Products of dequantised values are summed per K-chunk of ``promotion_interval`` (``None``: one chunk = all
    of K) in an accumulator rounded to ``accumulator_mantissa_bits`` after each add (``None``: exact chunk sums
    rounded once to FP32); chunk sums are then added in order into an FP32 accumulator ("promotion").
    """
    _check_promotion(promotion_interval, accumulator_mantissa_bits)
    a_block = check_block_shape(a_block, "a_block")
    b_block = check_block_shape(b_block, "b_block")
    if a_data.dim() != 2 or b_data.dim() != 2:
        raise ValueError(f"fp8_gemm wants 2-D operands, got A {tuple(a_data.shape)} and B {tuple(b_data.shape)}")
    if a_data.shape[1] != b_data.shape[1]:
        raise ValueError(
            f"reduction dims differ: A is {tuple(a_data.shape)} and B is {tuple(b_data.shape)} (want A[M,K], B[N,K])"
        )
    a = dequantize_blockwise(a_data, a_scale_inv, a_block)
    b = dequantize_blockwise(b_data, b_scale_inv, b_block)
    return promoted_gemm(a, b, promotion_interval, accumulator_mantissa_bits).to(out_dtype)


def promoted_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    promotion_interval: Optional[int] = 128,
    accumulator_mantissa_bits: Optional[int] = None,
) -> torch.Tensor:
    """The accumulation half of `fp8_gemm`: ``A @ B.T`` in FP32 from already dequantized FP32 A [M, K], B [N, K]."""
    k = a.shape[1]
    size = k if promotion_interval is None else min(promotion_interval, k)
    chunks = math.ceil(k / size) if k else 0
    if chunks == 0:
        return torch.zeros(a.shape[0], b.shape[0], dtype=torch.float32, device=a.device)
    if accumulator_mantissa_bits is None:
        partial = _chunk_sums_exact(a, b, chunks, size)
    else:
        partial = _chunk_sums_limited(a, b, chunks, size, accumulator_mantissa_bits)
    out = partial[0].clone()
    for c in range(1, chunks):
        out += partial[c]
    return out


def fp8_matmul(
    x: torch.Tensor,
    w: torch.Tensor,
    promotion_interval: Optional[int] = 128,
    accumulator_mantissa_bits: Optional[int] = None,
    power_2_scale: bool = True,
    act_block: Sequence[int] = (1, 128),
    weight_block: Sequence[int] = (128, 128),
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Compute ``x @ w.T`` through FP8: x [..., K] in 1x128 tiles along K, w [N, K] in 128x128 blocks.

    Returns [..., N] in ``out_dtype`` (default: x's dtype).
    """
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D [N, K], got shape {tuple(w.shape)}")
    if x.dim() < 1 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"x's last dim must equal w's K={w.shape[1]}, got x of shape {tuple(x.shape)}")
    x2d = x.reshape(-1, x.shape[-1])
    xq, xs = quantize_blockwise(x2d, act_block, power_2_scale, name="x")
    wq, ws = quantize_blockwise(w, weight_block, power_2_scale, name="w")
    out = fp8_gemm(xq, xs, act_block, wq, ws, weight_block, promotion_interval, accumulator_mantissa_bits)
    return out.to(out_dtype or x.dtype).view(*x.shape[:-1], w.shape[0])
