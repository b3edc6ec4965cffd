"""Seeded weight initialisation that does not depend on the TP/PP/EP layout.

megatron-core draws initial weights from one RNG stream in module-construction order, so the same seed gives
different models under different pipeline or expert layouts. Here every tensor is drawn from its own
generator, keyed by the seed and the tensor's global name, then sliced to this rank's shard: a 1-rank run and
a PP=2 or EP=2 run start from the same model and their losses can be compared.
"""
from __future__ import annotations

import math
import re
import zlib

import torch
from megatron.core import parallel_state
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset


def global_name(local_name: str, layer_offset: int, expert_offset: int) -> str:
    """This rank's parameter name as the one-rank model would call it."""
    name = re.sub(r"^decoder\.layers\.(\d+)\.", lambda m: f"decoder.layers.{int(m.group(1)) + layer_offset}.",
                  local_name)
    return re.sub(r"\.local_experts\.(\d+)\.", lambda m: f".local_experts.{int(m.group(1)) + expert_offset}.", name)


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))


def _std(name: str, config) -> float:
    """megatron-core's choice: output projections get std / sqrt(2 * num_layers)."""
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return config.init_method_std / math.sqrt(2.0 * config.num_layers)
    return config.init_method_std


def _tp_shard(full: torch.Tensor, param: torch.nn.Parameter, name: str, config) -> torch.Tensor:
    """Slice a full tensor to this rank's tensor-parallel shard (fc1 of a gated MLP is [gate; up])."""
    if not getattr(param, "tensor_model_parallel", False):
        return full
    is_expert = not getattr(param, "allreduce", True)
    rank = (parallel_state.get_expert_tensor_parallel_rank() if is_expert
            else parallel_state.get_tensor_model_parallel_rank())
    size = (parallel_state.get_expert_tensor_parallel_world_size() if is_expert
            else parallel_state.get_tensor_model_parallel_world_size())
    dim = param.partition_dim
    if config.gated_linear_unit and "linear_fc1" in name:
        return torch.cat([half.chunk(size, dim=dim)[rank] for half in full.chunk(2, dim=dim)], dim=dim)
    return full.chunk(size, dim=dim)[rank]


def _full_shape(param: torch.nn.Parameter, name: str, config) -> list[int]:
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        is_expert = not getattr(param, "allreduce", True)
        size = (parallel_state.get_expert_tensor_parallel_world_size() if is_expert
                else parallel_state.get_tensor_model_parallel_world_size())
        shape[param.partition_dim] *= size
    return shape


@torch.no_grad()
def init_layout_independent(model: torch.nn.Module, seed: int) -> None:
    """Re-draw every parameter of one model chunk: N(0, std) matrices, unit norms, zero expert biases."""
    config = model.config
    layer_offset = get_transformer_layer_offset(config, vp_stage=getattr(model, "vp_stage", None))
    num_experts = config.num_moe_experts or 0
    expert_offset = parallel_state.get_expert_model_parallel_rank() * (
        num_experts // parallel_state.get_expert_model_parallel_world_size()) if num_experts else 0
    for local_name, param in model.named_parameters():
        name = global_name(local_name, layer_offset, expert_offset)
        if param.dim() == 1:  # RMSNorm weights
            param.fill_(1.0)
            continue
        full = torch.empty(_full_shape(param, name, config), dtype=torch.float32)
        full.normal_(0.0, _std(name, config), generator=_generator(seed, name))
        param.copy_(_tp_shard(full, param, name, config).to(param.dtype))
    for name, buffer in model.named_buffers():
        if name.endswith("expert_bias"):
            buffer.zero_()
