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
    "quantize_dequantize_blockwise",
    "round_to_e4m3",
    "dequantize_blockwise",
    "scale_from_amax",
    "check_block_shape",
]

FP8_DTYPE = torch.float8_e4m3fn
FP8_E4M3_MAX = 448.0  # largest finite float8_e4m3fn value
_FP32_MAX = torch.finfo(torch.float32).max
_FP32_EXPONENT_MASK = 0x7F800000
_ROUNDING_MAGIC = 1.5 * 2.0 ** 23


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


def _blocks(x2d: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """View a [rows, cols] matrix as [row blocks, b0, col blocks, b1], zero-padding partial edge blocks."""
    rows, cols = x2d.shape
    nb0, nb1 = _grid(rows, cols, block)
    pad_r, pad_c = nb0 * block[0] - rows, nb1 * block[1] - cols
    if pad_r or pad_c:
        x2d = torch.nn.functional.pad(x2d, (0, pad_c, 0, pad_r))
    return x2d.view(nb0, block[0], nb1, block[1])  # splitting dims is a view for any strides


def _unblock(blocks: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The inverse of `_blocks`: back to [rows, cols], cutting off the padding."""
    nb0, b0, nb1, b1 = blocks.shape
    full = blocks.reshape(nb0 * b0, nb1 * b1)
    return full if full.shape == (rows, cols) else full[:rows, :cols]


def _scale_blocks(x2d: torch.Tensor, per_block: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """x2d [rows, cols] times one FP32 factor per block, broadcast over the block (no per-element copy of it)."""
    rows, cols = x2d.shape
    return _unblock(_blocks(x2d, block) * per_block[:, None, :, None], rows, cols)


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


def _scaled_blocks(x: torch.Tensor, block_shape: Sequence[int], power_2_scale: bool, name: str):
    """x as [row blocks, b0, col blocks, b1] times its block scales, clamped to +-448; the FP32 scale_inv;
    and x's matrix shape."""
    block = check_block_shape(block_shape)
    x2d = _as_2d(x, name)
    if not x2d.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    blocks = _blocks(x2d.to(torch.float32), block)
    amax = blocks.abs().amax(dim=(1, 3))  # zero padding cannot change an abs-max; NaN and Inf propagate
    if not bool(torch.isfinite(amax).all()):
        n_bad = int((~torch.isfinite(x2d)).sum().item())
        raise ValueError(
            f"cannot quantize {name!r}: it contains {n_bad} non-finite value(s) (NaN/Inf) out of {x2d.numel()}"
        )
    scale, scale_inv = scale_from_amax(amax, power_2_scale)
    return (blocks * scale[:, None, :, None]).clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX), scale_inv, x2d.shape


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
    scaled, scale_inv, (rows, cols) = _scaled_blocks(x, block_shape, power_2_scale, name)
    return _unblock(scaled, rows, cols).to(FP8_DTYPE).view(x.shape), scale_inv


def round_to_e4m3(v: torch.Tensor) -> torch.Tensor:
    """FP32 values in [-448, 448] rounded to the nearest E4M3 value, ties to even, in FP32: the bits of
    ``v.to(float8_e4m3fn).float()`` without its conversions, which run one element at a time on CPU."""
    # E4M3 keeps 3 mantissa bits, so its values are 2^(e-3) apart in [2^e, 2^(e+1)), and 2^-9 apart below
    # 2^-6 (subnormals). Keeping v's exponent bits gives 2^e (0 for zeros and FP32 denormals).
    spacing = (v.view(torch.int32) & _FP32_EXPONENT_MASK).view(torch.float32).mul_(0.125).clamp_min_(2.0 ** -9)
    steps = v / spacing  # exact (a power of two), and within +-16
    # Adding and removing 1.5 * 2^23 rounds an FP32 of magnitude < 2^22 to an integer, ties to even, as the
    # FPU rounds the sum; copysign keeps the sign of values that round to zero, as the E4M3 cast does.
    steps.add_(_ROUNDING_MAGIC).sub_(_ROUNDING_MAGIC)
    return torch.copysign(steps, v).mul_(spacing)


def quantize_dequantize_blockwise(
    x: torch.Tensor,
    block_shape: Sequence[int],
    power_2_scale: bool = True,
    *,
    name: str = "x",
) -> torch.Tensor:
    """``dequantize_blockwise(*quantize_blockwise(x, ...))`` as an FP32 [rows, cols] matrix, bit for bit: the
    operands of the emulated FP8 GEMMs, computed without materialising E4M3 codes."""
    scaled, scale_inv, (rows, cols) = _scaled_blocks(x, block_shape, power_2_scale, name)
    return _unblock(round_to_e4m3(scaled).mul_(scale_inv[:, None, :, None]), rows, cols)


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
    out = _scale_blocks(d2d.to(torch.float32), scale_inv.to(device=d2d.device, dtype=torch.float32), block)
    return out.to(dtype).view(data.shape)
