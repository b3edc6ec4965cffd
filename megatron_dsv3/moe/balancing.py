"""Auxiliary-loss-free balancing: the per-expert bias update, applied outside the optimizer."""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from megatron.core import parallel_state
from megatron.core.transformer.moe.moe_utils import get_updated_expert_bias


def biased_routers(model_chunks: Iterable[torch.nn.Module]) -> list[torch.nn.Module]:
    """Routers that carry an expert bias, in module order (decoder layers first, then MTP)."""
    return [mod for chunk in model_chunks for mod in chunk.modules()
            if getattr(mod, "expert_bias", None) is not None and mod.training]


@torch.no_grad()
def global_expert_loads(routers: list[torch.nn.Module]) -> torch.Tensor:
    """Tokens per expert of each router this step [routers, experts], summed over the tensor x data parallel
    ranks (a collective there): what the bias update sees, read before it resets the counters."""
    loads = torch.stack([r.local_tokens_per_expert for r in routers]).clone()
    if torch.distributed.is_initialized():
        group = parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True)
        if group.size() > 1:
            torch.distributed.all_reduce(loads, group=group)
    return loads


@torch.no_grad()
def update_expert_bias(model_chunks: Iterable[torch.nn.Module], update_rate: Optional[float] = None,
                       group: Optional[torch.distributed.ProcessGroup] = None) -> Optional[torch.Tensor]:
    """b_i += gamma * sign(mean load - load_i) for every biased router, then reset the token counters.

    Loads are summed over the tensor x data(-and-expert) parallel ranks first, so every replica applies the
    same update. Returns the global loads [routers, experts] read before the reset (for logging), or None.
    megatron-core's `finalize_model_grads` applies this same rule when it runs with
    `moe_router_enable_expert_bias`; use one of the two per step, not both.
    """
    routers = biased_routers(model_chunks)
    if not routers:
        return None
    rate = routers[0].config.moe_router_bias_update_rate if update_rate is None else update_rate
    group = group or parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True)
    loads = torch.stack([r.local_tokens_per_expert for r in routers])
    updated = get_updated_expert_bias(loads, torch.stack([r.expert_bias for r in routers]), rate, group)
    for router, bias in zip(routers, updated):
        router.expert_bias.copy_(bias)
        router.local_tokens_per_expert.zero_()
    return loads
