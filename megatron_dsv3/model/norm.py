"""RMSNorm modules in megatron-core's norm interface for the local (CPU) backend.

The norm is one autograd node (as Transformer Engine's fused norm is on GPUs), so its input receives a single
gradient: with `--recompute-modules layernorm` the gradient sums are then the same with and without
recomputation, bit for bit (a decomposed norm adds its internal contributions in another order).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class _RMSNormFunction(torch.autograd.Function):
    """y = x / rms(x) * w; the backward computes in FP32 for 16-bit inputs."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return F.rms_norm(x, (x.shape[-1],), weight, eps)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        compute = torch.promote_types(x.dtype, torch.float32)
        xf, gf = x.to(compute), grad.to(compute)
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + ctx.eps)
        normed = xf * rstd
        gw = gf * weight.to(compute)
        grad_x = rstd * (gw - normed * (gw * normed).mean(-1, keepdim=True))
        grad_w = (gf * normed).reshape(-1, x.shape[-1]).sum(0)
        return grad_x.to(x.dtype), grad_w.to(weight.dtype), None


class RMSNorm(torch.nn.RMSNorm):
    """torch RMSNorm built as megatron-core builds norms; flags its weight for sequence-parallel grad reduction."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **_):
        super().__init__(hidden_size, eps=eps)
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)):
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # no graph: skip the Function's cost
        return _RMSNormFunction.apply(x, self.weight, self.eps)


class LatentRMSNorm(RMSNorm):
    """RMSNorm on MLA's compressed q/kv latents: DeepSeek and Hugging Face fix its eps (1e-6), ignoring rms_norm_eps."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **_):
        super().__init__(config, hidden_size, eps=getattr(config, "mla_latent_norm_eps", eps))
