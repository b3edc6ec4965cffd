"""megatron-core tensor-parallel linears whose local GEMMs run in block-scaled FP8 (emulated or native).

`ColumnParallelLinear` / `RowParallelLinear` keep all their own logic (input copy/scatter, output gather,
all-reduce or reduce-scatter, bias handling, checkpoint sharding); only `_forward_impl`, the callable that
megatron-core uses for the local ``input @ weight.T`` with its in-GEMM communication (sequence-parallel
all-gather of the input, async all-reduce / reduce-scatter of dgrad), is replaced by `_FP8ParallelLinear`,
which does the same communication around `fp8_fprop`, `fp8_dgrad` and `fp8_wgrad`.

A layer class is bound to one `FP8Config` (`fp8_linear_classes(config)`), since megatron-core instantiates
spec modules with a fixed set of keyword arguments.
"""
from __future__ import annotations

import functools

import torch
from megatron.core.tensor_parallel import layers as _mcore_layers
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

from megatron_dsv3.compat import PassesAsColumnParallelLinear

from .linear import FP8Config, fp8_dgrad, fp8_fprop, fp8_wgrad

__all__ = ["FP8ColumnParallelLinear", "FP8RowParallelLinear", "fp8_down_proj_class", "fp8_linear_classes",
           "fp8_parallel_linear"]


def _gather_sequence(x: torch.Tensor, group) -> torch.Tensor:
    size = list(x.shape)
    size[0] *= group.size()
    out = torch.empty(size, dtype=x.dtype, device=x.device)
    _mcore_layers.dist_all_gather_func(out, x.contiguous(), group=group)
    return out


class _FP8ParallelLinear(torch.autograd.Function):
    """``input @ weight.T (+ bias)`` with FP8 GEMMs and megatron-core's in-GEMM tensor-parallel communication."""

    @staticmethod
    def forward(ctx, input, weight, bias, config, allreduce_dgrad, sequence_parallel, tp_group,
                gradient_accumulation_fusion):
        ctx.save_for_backward(input, weight)
        ctx.config, ctx.allreduce_dgrad, ctx.sequence_parallel = config, allreduce_dgrad, sequence_parallel
        ctx.tp_group, ctx.use_bias = tp_group, bias is not None
        ctx.fusion = bool(gradient_accumulation_fusion and hasattr(weight, "main_grad"))
        total = _gather_sequence(input, tp_group) if sequence_parallel else input
        y = fp8_fprop(total.reshape(-1, total.shape[-1]), weight, config)
        if bias is not None:
            y = y + bias.to(torch.float32)
        return y.to(input.dtype).view(*total.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        cfg: FP8Config = ctx.config
        total = _gather_sequence(input, ctx.tp_group) if ctx.sequence_parallel else input
        dy = grad_output.reshape(-1, grad_output.shape[-1]).contiguous()
        grad_input = fp8_dgrad(dy, weight, cfg).to(input.dtype).view(*total.shape)
        handle = None
        if ctx.allreduce_dgrad:
            handle = torch.distributed.all_reduce(grad_input, group=ctx.tp_group, async_op=True)
        elif ctx.sequence_parallel:
            sub = torch.empty(input.shape, dtype=input.dtype, device=input.device)
            handle = _mcore_layers.dist_reduce_scatter_func(sub, grad_input.contiguous(), group=ctx.tp_group,
                                                            async_op=True)
            grad_input = sub
        grad_weight = None
        if ctx.needs_input_grad[1]:
            dw = fp8_wgrad(dy, total.reshape(-1, total.shape[-1]), cfg)
            if ctx.fusion:
                # megatron-core's gradient-accumulation fusion: add into main_grad, hand autograd a dummy.
                weight.main_grad.add_(dw.to(weight.main_grad.dtype))
                if hasattr(weight, "grad_added_to_main_grad"):
                    weight.grad_added_to_main_grad = True
                    grad_weight = torch.zeros(weight.main_grad.shape, dtype=input.dtype, device=input.device)
            else:
                grad_weight = dw.to(weight.dtype)
        grad_bias = dy.to(torch.float32).sum(0).to(grad_output.dtype) if ctx.use_bias else None
        if handle is not None:
            handle.wait()
        return grad_input, grad_weight, grad_bias, None, None, None, None, None


def fp8_parallel_linear(input, weight, bias, config: FP8Config, *, gradient_accumulation_fusion=False,
                        allreduce_dgrad=False, sequence_parallel=False, tp_group=None, grad_output_buffer=None,
                        wgrad_deferral_limit=None, gtp_remat_size=1):
    """Drop-in for `linear_with_grad_accumulation_and_async_allreduce` whose GEMMs are block-scaled FP8."""
    if grad_output_buffer is not None:
        raise NotImplementedError("FP8 linears do not defer wgrad (defer_embedding_wgrad_compute is for the head)")
    if gtp_remat_size and gtp_remat_size > 1:
        raise NotImplementedError("FP8 linears do not support generalized tensor parallelism (gtp_remat_size > 1)")
    if allreduce_dgrad or sequence_parallel:
        tp_group = _mcore_layers.get_tensor_model_parallel_group_if_none(tp_group)
    return _FP8ParallelLinear.apply(input, weight, bias, config, allreduce_dgrad, sequence_parallel, tp_group,
                                    gradient_accumulation_fusion)


class _FP8ForwardImpl:
    """Mixin: megatron-core's `_forward_impl` hook, routed through `fp8_parallel_linear`."""

    fp8_config: FP8Config = FP8Config()

    def _forward_impl(self, input, weight, bias=None, gradient_accumulation_fusion=False, allreduce_dgrad=False,
                      sequence_parallel=False, grad_output_buffer=None, wgrad_deferral_limit=None, tp_group=None,
                      gtp_remat_size=1):
        return fp8_parallel_linear(
            input, weight, bias, self.fp8_config, gradient_accumulation_fusion=gradient_accumulation_fusion,
            allreduce_dgrad=allreduce_dgrad, sequence_parallel=sequence_parallel,
            tp_group=tp_group if tp_group is not None else self.tp_group, grad_output_buffer=grad_output_buffer,
            wgrad_deferral_limit=wgrad_deferral_limit, gtp_remat_size=gtp_remat_size)


class FP8ColumnParallelLinear(_FP8ForwardImpl, ColumnParallelLinear):
    """`ColumnParallelLinear` with block-scaled FP8 fprop, dgrad and wgrad (default `FP8Config`)."""


class FP8RowParallelLinear(_FP8ForwardImpl, RowParallelLinear):
    """`RowParallelLinear` with block-scaled FP8 fprop, dgrad and wgrad (default `FP8Config`)."""


@functools.lru_cache(maxsize=None)
def fp8_down_proj_class(config: FP8Config = FP8Config()) -> type:
    """The MLA q/kv down projection (a column-parallel linear) with FP8 GEMMs, accepted by megatron-core's MLA."""
    col, _ = fp8_linear_classes(config)
    return PassesAsColumnParallelLinear(f"{col.__name__}_DownProj", (col,), {"__module__": __name__})


@functools.lru_cache(maxsize=None)
def fp8_linear_classes(config: FP8Config = FP8Config()) -> tuple[type, type]:
    """(column, row) parallel linear classes bound to `config` (cached, so specs compare equal)."""
    if config == FP8Config():
        return FP8ColumnParallelLinear, FP8RowParallelLinear
    tag = f"{config.scaling}_{config.gemm}"
    col = type(f"FP8ColumnParallelLinear_{tag}", (FP8ColumnParallelLinear,), {"fp8_config": config,
                                                                             "__module__": __name__})
    row = type(f"FP8RowParallelLinear_{tag}", (FP8RowParallelLinear,), {"fp8_config": config, "__module__": __name__})
    return col, row
