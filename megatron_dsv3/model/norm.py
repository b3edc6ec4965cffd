"""RMSNorm modules in megatron-core's norm interface for the local (CPU) backend."""
from __future__ import annotations

import torch


class RMSNorm(torch.nn.RMSNorm):
    """torch RMSNorm built as megatron-core builds norms; flags its weight for sequence-parallel grad reduction."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **_):
        super().__init__(hidden_size, eps=eps)
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)


class LatentRMSNorm(RMSNorm):
    """RMSNorm on MLA's compressed q/kv latents: DeepSeek and Hugging Face fix its eps (1e-6), ignoring rms_norm_eps."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **_):
        super().__init__(config, hidden_size, eps=getattr(config, "mla_latent_norm_eps", eps))
