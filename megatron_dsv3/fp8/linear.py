"""FP8 block-scaled linear layer (DeepSeek-V3 recipe, emulated): fprop, dgrad and wgrad all run as FP8 GEMMs.

Every GEMM quantizes its operands along that GEMM's own reduction dim, so the backward pass re-quantizes the
transposed operands (W^T for dgrad, dy^T and x^T for wgrad) from high precision instead of transposing FP8 data.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .gemm import _check_promotion, promoted_gemm
from .quantize import FP8_E4M3_MAX, check_block_shape, quantize_dequantize_blockwise, round_to_e4m3

__all__ = ["FP8Config", "FP8BlockwiseLinearFunction", "fp8_dgrad", "fp8_fprop", "fp8_linear",
           "fp8_wgrad"]


@dataclasses.dataclass(frozen=True)
class FP8Config:
    """Numerics of the emulated FP8 linear: block shapes, scale rounding and Hopper accumulator model."""

    promotion_interval: Optional[int] = 128
    accumulator_mantissa_bits: Optional[int] = None
    power_2_scale: bool = True
    weight_block: tuple = (128, 128)
    act_block: tuple = (1, 128)
    # "blockwise": 448/amax scales per block (the recipe). "none": cast to E4M3 with scale 1, a numerics
    # negative control that shows what the scaling buys (small gradients underflow, large values clamp).
    scaling: str = "blockwise"
    # "emulated": fp8_gemm on any device. "native": torch's block-scaled FP8 matmul on a Hopper GPU (native.py).
    gemm: str = "emulated"

    def __post_init__(self) -> None:
        if self.scaling not in ("blockwise", "none"):
            raise ValueError(f"FP8Config.scaling must be 'blockwise' or 'none', got {self.scaling!r}")
        if self.gemm not in ("emulated", "native"):
            raise ValueError(f"FP8Config.gemm must be 'emulated' or 'native', got {self.gemm!r}")
        try:
            _check_promotion(self.promotion_interval, None)
        except ValueError as e:
            raise ValueError(f"FP8Config.promotion_interval: {e}") from None
        try:
            _check_promotion(None, self.accumulator_mantissa_bits)
        except ValueError as e:
            raise ValueError(f"FP8Config.accumulator_mantissa_bits: {e}") from None
        if not isinstance(self.power_2_scale, bool):
            raise ValueError(f"FP8Config.power_2_scale must be a bool, got {self.power_2_scale!r}")
        for field in ("weight_block", "act_block"):
            block = check_block_shape(getattr(self, field), f"FP8Config.{field}")
            object.__setattr__(self, field, block)


def _quantize_dequantize(x: torch.Tensor, block, cfg: FP8Config, name: str) -> torch.Tensor:
    """What the FP8 GEMM computes with: x's E4M3 values times their block scales, in FP32."""
    if cfg.scaling == "none":
        return round_to_e4m3(x.to(torch.float32).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX))
    return quantize_dequantize_blockwise(x, block, cfg.power_2_scale, name=name)


def _qgemm(a: torch.Tensor, a_block, b: torch.Tensor, b_block, cfg: FP8Config, names) -> torch.Tensor:
    """Quantize A [M, K] and B [N, K] along K and return the FP8 ``A @ B.T`` in FP32 (emulated or native)."""
    if a.numel() == 0 or b.numel() == 0:  # e.g. an expert that received no tokens (wgrad then has K = 0)
        return torch.zeros(a.shape[0], b.shape[0], dtype=torch.float32, device=a.device)
    if cfg.gemm == "native":
        from .native import native_qgemm

        return native_qgemm(a, a_block, b, b_block, cfg, names)
    return promoted_gemm(_quantize_dequantize(a, a_block, cfg, names[0]),
                         _quantize_dequantize(b, b_block, cfg, names[1]),
                         cfg.promotion_interval, cfg.accumulator_mantissa_bits)


def fp8_fprop(x: torch.Tensor, weight: torch.Tensor, cfg: FP8Config) -> torch.Tensor:
    """y [T, N] = x [T, K] @ W^T: x tiles 1x128 along K, W blocks 128x128. FP32 result."""
    return _qgemm(x, cfg.act_block, weight, cfg.weight_block, cfg, ("x", "weight"))


def fp8_dgrad(dy: torch.Tensor, weight: torch.Tensor, cfg: FP8Config) -> torch.Tensor:
    """dx [T, K] = dy [T, N] @ W: reduce over N, so dy is tiled along N and W^T [K, N] is quantized afresh."""
    return _qgemm(dy, cfg.act_block, weight.t().contiguous(), cfg.weight_block, cfg, ("grad_output", "weight^T"))


def fp8_wgrad(dy: torch.Tensor, x: torch.Tensor, cfg: FP8Config) -> torch.Tensor:
    """dW [N, K] = dy^T [N, T] @ x [T, K]: reduce over tokens, so dy^T and x^T are tiled 1x128 along T."""
    return _qgemm(dy.t().contiguous(), cfg.act_block, x.t().contiguous(), cfg.act_block, cfg,
                  ("grad_output^T", "x^T"))


class FP8BlockwiseLinearFunction(torch.autograd.Function):
    """Autograd op for ``y = x @ W^T + b`` on 2-D x [T, K], with FP8 block-scaled GEMMs in both passes."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], config: FP8Config):
        if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
            raise ValueError(f"want x [T, K] and weight [N, K], got {tuple(x.shape)} and {tuple(weight.shape)}")
        y = fp8_fprop(x, weight, config)
        if bias is not None:
            y = y + bias.to(torch.float32)
        ctx.config = config
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.save_for_backward(x, weight)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight = ctx.saved_tensors
        cfg: FP8Config = ctx.config
        dy = dy.contiguous()
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = fp8_dgrad(dy, weight, cfg).to(x.dtype)
        if ctx.needs_input_grad[1]:
            dw = fp8_wgrad(dy, x, cfg).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.to(torch.float32).sum(0).to(ctx.bias_dtype)
        return dx, dw, db, None


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    config: Optional[FP8Config] = None,
) -> torch.Tensor:
    """``F.linear`` through emulated DeepSeek-V3 FP8 GEMMs; x [..., K] is flattened to [T, K] and restored."""
    config = FP8Config() if config is None else config
    if not isinstance(config, FP8Config):
        raise ValueError(f"config must be an FP8Config, got {type(config).__name__}")
    if x.dim() < 1 or weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"want x [..., K] and weight [N, K], got {tuple(x.shape)} and {tuple(weight.shape)}")
    y = FP8BlockwiseLinearFunction.apply(x.reshape(-1, x.shape[-1]), weight, bias, config)
    return y.view(*x.shape[:-1], weight.shape[0])
