"""DeepSeek-V3 router: sigmoid affinities, bias-steered node-limited top-k, unbiased normalised gates."""
from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.moe.moe_utils import apply_router_token_dropping, compute_routing_scores_for_aux_loss
from megatron.core.transformer.moe.router import TopKRouter

from megatron_dsv3 import compat


def deepseek_topk(
    logits: torch.Tensor,
    topk: int,
    *,
    score_function: str = "sigmoid",
    expert_bias: Optional[torch.Tensor] = None,
    num_groups: int = 1,
    group_topk: int = 1,
    norm_topk_prob: bool = True,
    scaling_factor: float = 1.0,
    group_score: str = "top2_sum",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Select experts as DeepSeek-V3 does; returns (gates [T, k], expert indices [T, k]).

    The bias only steers selection; gates come from the unbiased scores. A group is scored by the sum of its
    two best biased scores whatever topk/group_topk is (megatron-core uses topk // group_topk instead), or
    with `group_score="max"` by its best score (DeepSeek-V2's group_limited_greedy).
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32, or fp64 if the router runs so
    if score_function == "sigmoid":
        scores = torch.sigmoid(logits)
    elif score_function == "softmax":
        scores = torch.softmax(logits, dim=-1)
    else:
        raise ValueError(f"score_function: expected 'sigmoid' or 'softmax', got {score_function!r}")
    choice = scores if expert_bias is None else scores + expert_bias.to(scores.dtype)
    if num_groups > 1:
        num_tokens, num_experts = choice.shape
        grouped = choice.view(num_tokens, num_groups, num_experts // num_groups)
        if group_score == "max":
            group_scores = grouped.amax(dim=-1)
        else:
            group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(dim=-1)
        kept_groups = group_scores.topk(group_topk, dim=-1, sorted=False).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept_groups, True)
        expert_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(num_tokens, num_experts)
        choice = choice.masked_fill(~expert_mask, float("-inf"))
    indices = choice.topk(topk, dim=-1, sorted=False).indices
    gates = scores.gather(1, indices)
    if norm_topk_prob and topk > 1:
        gates = gates / (gates.sum(dim=-1, keepdim=True) + 1e-20)
    return gates * scaling_factor, indices


class DeepSeekRouter(TopKRouter):
    """megatron-core's TopKRouter with DeepSeek-V3's selection; balance losses, z-loss, token dropping (with
    --moe-expert-capacity-factor) and bias counters reused.

    megatron-core's post-softmax gate (softmax over the selected logits, `moe_router_pre_softmax` off) equals
    DeepSeek's softmax gate normalised over the top-k, so it is honoured as `norm_topk_prob`."""

    def select(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gates [T, k], expert indices [T, k]) for router logits [T, experts], as this layer's flags ask."""
        return deepseek_topk(
            logits,
            self.topk,
            score_function=self.score_function,
            expert_bias=self.expert_bias,
            num_groups=self.config.moe_router_num_groups or 1,
            group_topk=self.config.moe_router_group_topk or 1,
            norm_topk_prob=self.config.moe_router_norm_topk_prob or (
                self.score_function == "softmax" and not self.config.moe_router_pre_softmax),
            scaling_factor=self.config.moe_router_topk_scaling_factor or 1.0,
            group_score=getattr(self.config, "moe_router_group_score", "top2_sum"),
        )

    # Count each expert's tokens for the bias update as megatron-core does, without its torch.compile.
    _apply_expert_bias = compat.uncompiled(TopKRouter._apply_expert_bias)

    def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        seq_length, bsz = logits.shape[:2]
        num_experts = self.config.num_moe_experts
        logits = logits.view(-1, num_experts)
        if padding_mask is not None:
            padding_mask = padding_mask.reshape(-1)
        logits = self.apply_z_loss(logits, padding_mask=padding_mask)

        gates, indices = self.select(logits)
        probs = torch.zeros_like(logits, dtype=gates.dtype).scatter(1, indices, gates)
        routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter(1, indices, True)
        if self.config.moe_expert_capacity_factor is not None:
            probs, routing_map = apply_router_token_dropping(
                probs, routing_map, router_topk=self.topk, capacity_factor=self.config.moe_expert_capacity_factor,
                drop_policy=self.config.moe_token_drop_policy,
                pad_to_capacity=self.config.moe_pad_expert_input_to_capacity)

        if self.training and torch.is_grad_enabled() and self.is_aux_loss_enabled():
            # Sequence-wise balance loss of the report (eq. 17-20): unbiased top-k, normalised affinities.
            map_for_aux, scores_for_aux = compute_routing_scores_for_aux_loss(
                logits, self.topk, self.score_function, padding_mask=padding_mask
            )
            with_mask = padding_mask is not None
            probs = self._apply_aux_loss(probs, scores_for_aux, map_for_aux, with_padding_mask=with_mask)
            probs = self._apply_seq_aux_loss(
                probs, scores_for_aux, map_for_aux, seq_length, bsz, with_padding_mask=with_mask
            )
            probs = self._apply_global_aux_loss(probs, scores_for_aux, map_for_aux, with_padding_mask=with_mask)

        self._apply_expert_bias(routing_map, padding_mask=padding_mask)
        return probs, routing_map
