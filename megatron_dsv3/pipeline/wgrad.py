"""Weight-gradient deferral (the schedules' W): a split backward computes input gradients now, linear-layer
weight gradients later.

megatron-core's local linears run their GEMMs through the `_forward_impl` method (which calls
`linear_with_grad_accumulation_and_async_allreduce`); `enable_wgrad_deferral(model)` points it at a linear
whose backward, inside `deferred_weight_grads()`, returns the input gradient and queues dW = dY^T X instead.
The formulas are megatron-core's, so a deferred gradient equals the immediate one bit for bit. Layers whose
backward communicates (tensor-parallel dgrad all-reduce, sequence parallelism), Transformer Engine and the FP8
linears keep computing W inside B: that is "where the layers allow it".
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, Optional

import torch
from megatron.core.tensor_parallel import layers as tp_layers
from megatron.core.tensor_parallel.layers import (ColumnParallelLinear, RowParallelLinear,
                                                  linear_with_frozen_weight,
                                                  linear_with_grad_accumulation_and_async_allreduce)

# What megatron-core's ColumnParallelLinear/RowParallelLinear._forward_impl calls, by weight.requires_grad.
_MCORE_IMPL = {True: linear_with_grad_accumulation_and_async_allreduce, False: linear_with_frozen_weight}

_queue = threading.local()  # per thread: an overlapped pair's two halves never share a queue


def _pending() -> Optional[list]:
    return getattr(_queue, "pending", None)


@contextmanager
def deferred_weight_grads():
    """Inside, deferrable linears queue their weight gradients; yields the queue (callables to run as W)."""
    saved, _queue.pending = _pending(), []
    try:
        yield _queue.pending
    finally:
        _queue.pending = saved


def _accumulate(weight: torch.Tensor, grad_output: torch.Tensor, inputs: torch.Tensor, fused: bool) -> None:
    """dW = dY^T X: with gradient-accumulation fusion through megatron-core's fused kernel into main_grad,
    otherwise computed in the operands' dtype and added to main_grad (DDP) or .grad, as autograd would."""
    if fused:
        kernel = tp_layers.fused_weight_gradient_mlp_cuda
        accumulate = kernel.wgrad_gemm_accum_fp32 if weight.main_grad.dtype == torch.float32 \
            else kernel.wgrad_gemm_accum_fp16
        accumulate(inputs, grad_output, weight.main_grad)
        return
    grad = grad_output.t().matmul(inputs)
    if hasattr(weight, "main_grad"):
        weight.main_grad.add_(grad)
    elif weight.grad is None:
        weight.grad = grad
    else:
        weight.grad += grad


class _DeferrableLinear(torch.autograd.Function):
    """Y = X W^T (+ b) with megatron-core's forward and backward formulas and an optional deferred dW."""

    @staticmethod
    def forward(ctx, inputs, weight, bias, fused):
        ctx.save_for_backward(inputs, weight)
        ctx.use_bias, ctx.fused = bias is not None, fused and hasattr(weight, "main_grad")
        output = torch.matmul(inputs, weight.t())
        return output + bias if bias is not None else output

    @staticmethod
    def backward(ctx, grad_output):
        inputs, weight = ctx.saved_tensors
        grad_input = grad_output.matmul(weight)
        grad_output = grad_output.reshape(-1, grad_output.shape[-1])
        inputs = inputs.reshape(-1, inputs.shape[-1])
        grad_bias = grad_output.sum(dim=0) if ctx.use_bias else None
        pending, fused = _pending(), ctx.fused
        if pending is None and not fused:
            return grad_input, grad_output.t().matmul(inputs), grad_bias, None
        if pending is None:
            _accumulate(weight, grad_output, inputs, fused)
        else:
            pending.append(lambda: _accumulate(weight, grad_output, inputs, fused))
        return grad_input, _main_grad_placeholder(weight, inputs.dtype) if fused else None, grad_bias, None


def _main_grad_placeholder(weight: torch.Tensor, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """What megatron-core's fused path hands autograd once dW goes straight into main_grad: an unused tensor
    that DDP's backward hook skips (`grad_added_to_main_grad`), so the hook still fires as for any weight."""
    if not hasattr(weight, "grad_added_to_main_grad"):
        return None
    weight.grad_added_to_main_grad = True
    make = torch.zeros if getattr(weight, "zero_out_wgrad", False) else torch.empty  # DDP adds it if zero_out
    return make(weight.main_grad.shape, dtype=dtype, device=weight.main_grad.device)


def _deferrable_forward_impl(input, weight, *args, **kwargs):
    """Takes megatron-core's `_forward_impl` arguments; hands them to its own function where W cannot be split
    off (frozen weight, tensor-parallel dgrad all-reduce, sequence parallelism, its own deferral buffer)."""
    communicates = kwargs.get("allreduce_dgrad") or kwargs.get("sequence_parallel") or \
        kwargs.get("grad_output_buffer") is not None or kwargs.get("gtp_remat_size", 1) > 1
    if args or communicates or not weight.requires_grad:
        return _MCORE_IMPL[weight.requires_grad](input, weight, *args, **kwargs)
    fused = bool(kwargs.get("gradient_accumulation_fusion"))
    return _DeferrableLinear.apply(input, weight, kwargs.get("bias"), fused)


def enable_wgrad_deferral(model: torch.nn.Module) -> int:
    """Let `model`'s local megatron-core linears defer W; returns how many linears can."""
    count = 0
    for module in model.modules():
        if getattr(type(module), "_forward_impl", None) in (ColumnParallelLinear._forward_impl,
                                                            RowParallelLinear._forward_impl):
            module._forward_impl = _deferrable_forward_impl  # subclasses with their own GEMM are left alone
            count += 1
    return count


def run_all(pending: list[Callable[[], None]]) -> None:
    """The W op: every queued weight gradient of one (chunk, micro-batch) backward."""
    with torch.no_grad():
        for compute in pending:
            compute()
    pending.clear()
