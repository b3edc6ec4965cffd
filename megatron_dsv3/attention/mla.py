"""MLA self-attention that builds exactly the submodules its spec names."""
from __future__ import annotations

from megatron.core.transformer.multi_latent_attention import MLASelfAttention


class DSV3MLASelfAttention(MLASelfAttention):
    """megatron-core's MLASelfAttention without its Q/KV-norm resolver.

    The resolver (transformer/mla_qk_norm_config.py) demands a fused norm+linear `linear_q_proj` when
    q_lora_rank is None, which the local backend lacks and DeepSeek does not have (no norm on an
    uncompressed query). The dsv3 spec already states every projection and latent norm explicitly.
    """

    def _resolve_qk_norm_config(self, submodules):
        return dict(
            linear_q_proj=submodules.linear_q_proj,
            linear_q_up_proj=submodules.linear_q_up_proj,
            linear_kv_up_proj=submodules.linear_kv_up_proj,
            q_layernorm=submodules.q_layernorm,
            kv_layernorm=submodules.kv_layernorm,
        )
