"""Emulated DeepSeek-V3 FP8 training numerics: block-wise E4M3 quantization, Hopper-style GEMM, FP8 linear."""
from .gemm import fp8_gemm, fp8_matmul, round_mantissa_
from .linear import FP8BlockwiseLinearFunction, FP8Config, fp8_linear
from .quantize import FP8_DTYPE, FP8_E4M3_MAX, dequantize_blockwise, quantize_blockwise, scale_from_amax

__all__ = [
    "FP8_DTYPE",
    "FP8_E4M3_MAX",
    "FP8BlockwiseLinearFunction",
    "FP8Config",
    "dequantize_blockwise",
    "fp8_gemm",
    "fp8_linear",
    "fp8_matmul",
    "quantize_blockwise",
    "round_mantissa_",
    "scale_from_amax",
]
