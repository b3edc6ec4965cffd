"""Block-wise FP8 (E4M3) quantization with DeepSeek-V3 / Transformer Engine ``Float8BlockScaling`` semantics.

Everything runs on plain torch (CPU or GPU) so that FP8 numerics can be emulated and tested bit for bit.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = [
    "FP8_E4M3_MAX",
    "FP8_DTYPE",
    "quantize_blockwise",
    "dequantize_blockwise",
    "scale_from_amax",
    "expand_block_scale",
    "check_block_shape",
]

FP8_DTYPE = torch.float8_e4m3fn
FP8_E4M3_MAX = 448.0  # largest finite float8_e4m3fn value
_FP32_MAX = torch.finfo(torch.float32).max
_FP32_EXPONENT_MASK = 0x7F800000


def check_block_shape(block_shape: Sequence[int], what: str = "block_shape") -> tuple[int, int]:
    """Validate a 2-tuple of positive ints and return it as a tuple; raise ValueError otherwise."""
    try:
        b0, b1 = block_shape
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a pair of positive ints, got {block_shape!r}") from None
    for b in (b0, b1):
        if isinstance(b, bool) or not isinstance(b, int) or b <= 0:
            raise ValueError(f"{what} must be a pair of positive ints, got {block_shape!r}")
    return int(b0), int(b1)


def _as_2d(x: torch.Tensor, name: str) -> torch.Tensor:
    """Flatten leading dims so that the last dim is the column (quantization) dim."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"{name} must have at least 2 dims to be viewed as a matrix, got shape {tuple(x.shape)}")
    return x.reshape(-1, x.shape[-1])


def _grid(rows: int, cols: int, block: tuple[int, int]) -> tuple[int, int]:
    return math.ceil(rows / block[0]), math.ceil(cols / block[1])


def _block_amax(x2d: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Per-block max |x| in FP32; edge blocks are zero-padded, which cannot change an abs-max."""
    rows, cols = x2d.shape
    nb0, nb1 = _grid(rows, cols, block)
    pad_r, pad_c = nb0 * block[0] - rows, nb1 * block[1] - cols
    a = x2d.abs()
    if pad_r or pad_c:
        a = torch.nn.functional.pad(a, (0, pad_c, 0, pad_r))
    return a.view(nb0, block[0], nb1, block[1]).amax(dim=(1, 3))


def scale_from_amax(amax: torch.Tensor, power_2_scale: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn FP32 block amaxes into (scale, scale_inv): scale = 448/amax, correctly rounded, optionally floored to 2^n.

    Zero blocks get scale 1; a scale that overflows is clamped to the FP32 max (2^127 when power-of-two).
    """
    amax = amax.to(torch.float32)
    # Tensor/tensor division is correctly rounded; the scalar form ``448.0 / amax`` is reciprocal-then-multiply.
    scale = torch.full_like(amax, FP8_E4M3_MAX) / amax
    scale = torch.where(torch.isinf(scale), torch.full_like(scale, _FP32_MAX), scale)
    scale = torch.where(amax == 0, torch.ones_like(scale), scale)
    if power_2_scale:
        # scale is positive and normal here, so keeping only the exponent bits floors it to a power of two.
        bits = scale.view(torch.int32) & _FP32_EXPONENT_MASK
        scale = bits.view(torch.float32)
    scale_inv = torch.ones_like(scale) / scale
    return scale, scale_inv


def expand_block_scale(scale: torch.Tensor, block: tuple[int, int], rows: int, cols: int) -> torch.Tensor:
    """Broadcast a per-block grid to a (rows, cols) per-element tensor, cutting off partial edge blocks."""
    full = scale.repeat_interleave(block[0], dim=0).repeat_interleave(block[1], dim=1)
    return full[:rows, :cols]


def quantize_blockwise(
    x: torch.Tensor,
    block_shape: Sequence[int],
    power_2_scale: bool = True,
    *,
    name: str = "x",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` (2-D, or N-D seen as [prod(leading), last]) to float8_e4m3fn with one scale per block.

    Returns ``(data, scale_inv)``: ``data`` has x's shape; ``scale_inv`` is FP32 of shape
    (ceil(rows/b0), ceil(cols/b1)) and satisfies ``x ~= data * scale_inv`` block by block.
    Use block_shape (1, 128) for activations and (128, 128) for weights. Raises ValueError on NaN/Inf.
    """
    block = check_block_shape(block_shape)
    x2d = _as_2d(x, name)
    if not x2d.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    n_bad = int((~torch.isfinite(x2d)).sum().item())
    if n_bad:
        raise ValueError(
            f"cannot quantize {name!r}: it contains {n_bad} non-finite value(s) (NaN/Inf) out of {x2d.numel()}"
        )
    xf = x2d.to(torch.float32)
    rows, cols = xf.shape
    scale, scale_inv = scale_from_amax(_block_amax(xf, block), power_2_scale)
    scaled = xf * expand_block_scale(scale, block, rows, cols)
    data = scaled.clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_DTYPE)
    return data.view(x.shape), scale_inv


def dequantize_blockwise(
    data: torch.Tensor,
    scale_inv: torch.Tensor,
    block_shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Return ``data * scale_inv`` (scale_inv broadcast over its blocks, FP32 math) cast to ``dtype``.

    This is also the DeepSeek-V3 checkpoint dequantizer: ``dequantize_blockwise(w, weight_scale_inv, (128, 128))``
    for an FP8 ``weight`` and its per-128x128-block ``weight_scale_inv``.
    """
    block = check_block_shape(block_shape)
    d2d = _as_2d(data, "data")
    if not isinstance(scale_inv, torch.Tensor) or scale_inv.dim() != 2:
        shape = tuple(scale_inv.shape) if isinstance(scale_inv, torch.Tensor) else type(scale_inv).__name__
        raise ValueError(f"scale_inv must be a 2-D tensor, got {shape}")
    rows, cols = d2d.shape
    expected = _grid(rows, cols, block)
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"scale_inv has shape {tuple(scale_inv.shape)} but data of matrix shape {(rows, cols)} with "
            f"block_shape {block} needs {expected}"
        )
    si = expand_block_scale(scale_inv.to(device=d2d.device, dtype=torch.float32), block, rows, cols)
    out = d2d.to(torch.float32) * si
    return out.to(dtype).view(data.shape)
