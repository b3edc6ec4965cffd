"""Run a model with a redundant-expert placement: each logical expert may have several physical replicas
that share its weights and split its tokens, so outputs equal the unreplicated model's."""
from __future__ import annotations

import torch

from megatron_dsv3.inference.eplb import Placement


class ReplicatedExperts(torch.nn.Module):
    """A MoE layer's experts (all local, EP=1) served through a placement's physical slots.

    Expert e's tokens are split into `replicas[e]` nearly equal, order-preserving parts, one per replica;
    `tokens_per_slot` counts what each physical slot (GPU-major order of `placement.gpus`) computed."""

    def __init__(self, experts: torch.nn.Module, placement: Placement):
        super().__init__()
        if len(placement.replicas) != len(experts.local_experts):
            raise ValueError(f"placement: {len(placement.replicas)} experts, the layer has "
                             f"{len(experts.local_experts)} (expert parallelism must be 1)")
        self.experts = experts
        self.placement = placement
        flat = [e for gpu in placement.gpus for e in gpu]
        self.slots_of = [[s for s, x in enumerate(flat) if x == e] for e in range(len(placement.replicas))]
        self.register_buffer("tokens_per_slot", torch.zeros(len(flat), dtype=torch.long), persistent=False)

    def forward(self, hidden: torch.Tensor, tokens_per_expert: torch.Tensor, probs: torch.Tensor):
        sizes = [int(n) for n in tokens_per_expert]
        outputs = []
        for e, (tokens, weights) in enumerate(zip(torch.split(hidden, sizes), torch.split(probs, sizes))):
            slots = self.slots_of[e]
            parts = [len(tokens) // len(slots) + (j < len(tokens) % len(slots)) for j in range(len(slots))]
            for slot, part, part_weights in zip(slots, torch.split(tokens, parts), torch.split(weights, parts)):
                self.tokens_per_slot[slot] += len(part)
                outputs.append(self.experts.local_experts[e](part, part_weights)[0])
        return torch.cat(outputs), None


def moe_layers(model) -> list:
    """The decoder's MoE layers in order (the MTP block's are not placed)."""
    return [layer.mlp for layer in model.decoder.layers if hasattr(layer.mlp, "router")]


def apply_placement(model, placements: list[Placement]) -> list[ReplicatedExperts]:
    """Serve each decoder MoE layer's experts through its placement; returns the wrappers (token counters)."""
    layers = moe_layers(model)
    if len(placements) != len(layers):
        raise ValueError(f"placement: {len(placements)} layers given, the model has {len(layers)} MoE layers")
    wrappers = []
    for moe, placement in zip(layers, placements):
        moe.experts = ReplicatedExperts(moe.experts, placement)
        wrappers.append(moe.experts)
    return wrappers
