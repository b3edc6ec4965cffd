"""Routed experts as grouped GEMMs for the local backend (`--moe-grouped-gemm`).

The experts keep SequentialMLP's parameters (`local_experts.N.linear_fc1/fc2.weight`), so checkpoints, the
Hugging Face mapping and layout-independent initialisation are unchanged; the forward stacks them and runs
fc1 and fc2 for all local experts at once with `torch._grouped_mm` (bitwise equal to one GEMM per expert).
With `--recompute-granularity selective --recompute-modules moe_act` the SwiGLU output is dropped after fc2
and recomputed in backward, as megatron-core's TEGroupedMLP does on GPUs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.moe.experts import SequentialMLP


def grouped_linear(x: torch.Tensor, weights: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Row block g of `x` (rows offsets[g-1]:offsets[g]) times weights[g]^T, for every group at once
    (one GEMM per group where grouped_mm's 16-byte alignment does not hold)."""
    if any(n * x.element_size() % 16 for n in weights.shape[1:]):
        sizes = torch.diff(offsets, prepend=offsets.new_zeros(1)).tolist()
        return torch.cat([F.linear(part, w) for part, w in zip(torch.split(x, sizes), weights)])
    out = torch._grouped_mm(x, weights.transpose(1, 2), offs=offsets)
    if out.requires_grad:
        out.register_hook(torch.Tensor.contiguous)  # grouped_mm's backward needs a dense gradient
    return out


class GroupedMLP(SequentialMLP):
    """SequentialMLP's experts computed as two grouped GEMMs over the tokens of all local experts."""

    def __init__(self, num_local_experts, config, submodules, pg_collection=None, name=None):
        super().__init__(num_local_experts, config, submodules, pg_collection=pg_collection, name=name)
        self.activation_recompute = (config.recompute_granularity == "selective"
                                     and "moe_act" in (config.recompute_modules or []))

    def _activation(self, fc1_output: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """SwiGLU, then each token's routing probability (megatron-core's MLP with a per-token scale)."""
        gate, up = torch.chunk(fc1_output, 2, dim=-1)
        return (F.silu(gate) * up * probs.unsqueeze(-1)).to(fc1_output.dtype)

    def forward(self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor,
                permuted_probs: torch.Tensor):
        hidden, probs = permuted_local_hidden_states, permuted_probs
        if self.config.moe_apply_probs_on_input:
            hidden = (probs.unsqueeze(-1) * hidden).to(hidden.dtype)
            probs = torch.ones_like(probs)
        offsets = torch.as_tensor(tokens_per_expert, device=hidden.device).cumsum(0).to(torch.int32)
        fc1 = torch.stack([expert.linear_fc1.weight for expert in self.local_experts])
        fc2 = torch.stack([expert.linear_fc2.weight for expert in self.local_experts])
        intermediate = grouped_linear(hidden, fc1, offsets)
        if self.activation_recompute:
            checkpoint = tensor_parallel.CheckpointWithoutOutput(fp8=None)  # (fp8=False would mean True)
            activated = checkpoint.checkpoint(self._activation, intermediate, probs)
            output = grouped_linear(activated, fc2, offsets)
            checkpoint.discard_output_and_register_recompute(output)
        else:
            output = grouped_linear(self._activation(intermediate, probs), fc2, offsets)
        return output, None
