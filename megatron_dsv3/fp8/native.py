"""Native Hopper FP8 GEMMs through torch's block-scaled matmul, fed by our quantizer (no Transformer Engine).

torch convention: ``mat_a [M, K]`` row-major times ``mat_b [K, N]`` column-major (our B [N, K] row-major,
transposed). Decoding scales (our ``scale_inv``) in the layouts torch's cuBLAS path expects on sm_90:

- 1x128 tiles of A [M, K]:     (M, ceil(K/128)) FP32, M-major ("column-major": stride (1, M)).
- 1x128 tiles of B [N, K]:     (N, ceil(K/128)) FP32, N-major, passed for mat_b as is.
- 128x128 blocks of B [N, K]:  our (ceil(N/128), ceil(K/128)) padded along K-blocks to a multiple of 4 (L4),
                               passed transposed as (L4, ceil(N/128)) with stride (1, L4).

`torch.nn.functional.scaled_mm` (with `ScalingType.BlockWise1x128` / `BlockWise128x128`) is used when the
installed torch has it, else `torch._scaled_mm`, which infers block-wise scaling from the scale shapes
((M, K/128) with (K/128, N/128) or (K/128, N)). Operands are zero-padded to K % 128 == 0 and M, N % 16 == 0
before quantization; zero padding changes no block's amax, so codes and scales of the real entries are
those of the unpadded tensor. Everything here imports on CPU; only `native_qgemm` needs a Hopper GPU.
"""
from __future__ import annotations

import importlib.util
import math

import torch
import torch.nn.functional as F

from .quantize import quantize_blockwise

__all__ = ["native_available", "native_qgemm", "native_scaled_mm", "prepare_scale", "pad_operand"]

_K_ALIGN, _MN_ALIGN = 128, 16


def native_available() -> bool:
    """A CUDA Hopper (sm_90) device, torch with float8 block-scaled matmul, and no Transformer Engine."""
    if not torch.cuda.is_available() or importlib.util.find_spec("transformer_engine") is not None:
        return False
    if torch.cuda.get_device_capability() != (9, 0):
        return False
    return hasattr(F, "scaled_mm") or hasattr(torch, "_scaled_mm")


def pad_operand(t: torch.Tensor) -> torch.Tensor:
    """Zero-pad a [R, K] operand to R % 16 == 0 and K % 128 == 0 (a no-op when already aligned)."""
    r, k = t.shape
    pr, pk = (-r) % _MN_ALIGN, (-k) % _K_ALIGN
    return F.pad(t, (0, pk, 0, pr)) if pr or pk else t


def prepare_scale(scale_inv: torch.Tensor, block, operand: str, api: str = "v2") -> torch.Tensor:
    """Our ``scale_inv`` (rows/b0, K/b1) of an operand quantized along K, in the layout torch consumes.

    ``operand`` is 'a' or 'b'; ``api`` is 'v2' (F.scaled_mm) or 'v1' (torch._scaled_mm).
    """
    block = tuple(block)
    s = scale_inv.to(torch.float32)
    if block == (1, 128):
        # (rows, K/128), rows-major in memory. For v1 mat_b wants the logical shape (K/128, N).
        mn_major = s.t().contiguous().t()
        return mn_major.t() if (api == "v1" and operand == "b") else mn_major
    if block == (128, 128):
        if api == "v1":
            # (K/128, N/128) for mat_b ((M/128, K/128) for mat_a)
            return s.t() if operand == "b" else s.contiguous()
        kb = s.shape[1]
        l4 = math.ceil(kb / 4) * 4
        padded = F.pad(s, (0, l4 - kb), value=1.0).contiguous()  # (rows/128, L4)
        return padded.t()  # (L4, rows/128), stride (1, L4)
    raise ValueError(f"native FP8 GEMM supports block shapes (1, 128) and (128, 128), got {block}")


def _recipe(block):
    st = F.ScalingType
    return st.BlockWise1x128 if tuple(block) == (1, 128) else st.BlockWise128x128


def native_scaled_mm(aq, asi, a_block, bq, bsi, b_block, out_dtype=torch.bfloat16, api: str = None):
    """``A @ B.T`` of quantized A [M, K], B [N, K] (K % 128 == 0) on FP8 tensor cores; returns [M, N]."""
    if api is None:
        api = "v2" if hasattr(F, "scaled_mm") else "v1"
    if tuple(a_block) == (128, 128) and tuple(b_block) == (128, 128):
        raise ValueError("torch's block-scaled matmul has no 128x128 x 128x128 form; tile one operand 1x128")
    mat_b = bq.t()  # [K, N] column-major
    sa = prepare_scale(asi, a_block, "a", api)
    sb = prepare_scale(bsi, b_block, "b", api)
    if api == "v2":
        sw = F.SwizzleType.NO_SWIZZLE
        return F.scaled_mm(aq, mat_b, sa, _recipe(a_block), sb, _recipe(b_block), swizzle_a=sw, swizzle_b=sw,
                           output_dtype=out_dtype)
    return torch._scaled_mm(aq, mat_b, scale_a=sa, scale_b=sb, out_dtype=out_dtype)


def native_qgemm(a: torch.Tensor, a_block, b: torch.Tensor, b_block, cfg, names) -> torch.Tensor:
    """The `FP8Config(gemm='native')` path of the FP8 linear: pad, quantize with our quantizer, torch's GEMM."""
    if cfg.scaling != "blockwise":
        raise ValueError("the native FP8 GEMM runs the blockwise recipe only (the no-scaling control is emulated)")
    m, n = a.shape[0], b.shape[0]
    ap, bp = pad_operand(a.contiguous()), pad_operand(b.contiguous())
    aq, asi = quantize_blockwise(ap, a_block, cfg.power_2_scale, name=names[0])
    bq, bsi = quantize_blockwise(bp, b_block, cfg.power_2_scale, name=names[1])
    out = native_scaled_mm(aq, asi, a_block, bq, bsi, b_block, out_dtype=torch.bfloat16)
    return out[:m, :n].to(torch.float32)
