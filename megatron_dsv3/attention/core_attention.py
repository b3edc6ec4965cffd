"""Local (non-TE) core attention for MLA: different key and value head sizes, causal or masked softmax."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


class MLACoreAttention(MegatronModule):
    """softmax(q k^T * scale) v for [s, b, heads, dim] tensors.

    megatron-core's local DotProductAttention rejects the k_channels/v_channels that MLA passes (q/k head dim
    192 vs v head dim 128 in DeepSeek-V3), so the local MLA spec injects this module instead.
    """

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str = "self",
                 softmax_scale: Optional[float] = None, k_channels: Optional[int] = None,
                 v_channels: Optional[int] = None, cp_comm_type=None, pg_collection=None, **_):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("context_parallel_size: the local MLA core attention supports 1 only (use --transformer-impl transformer_engine)")
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = softmax_scale
        self.dropout_p = config.attention_dropout

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, packed_seq_params=None, **_):
        if packed_seq_params is not None:
            raise ValueError("packed_seq_params: packed sequences need the TE backend")
        mask_type = attn_mask_type or self.attn_mask_type
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, dim]
        sq, sk = q.shape[-2], k.shape[-2]
        dropout_p = self.dropout_p if self.training else 0.0
        if attention_mask is None and mask_type == AttnMaskType.causal and sq == sk:
            out = _causal_attention(q, k, v, dropout_p, self.softmax_scale)
        else:
            allowed = _allowed(attention_mask, mask_type, sq, sk, q.device)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p,
                                                 scale=self.softmax_scale)
        b, heads, s, dv = out.shape
        return out.permute(2, 0, 1, 3).reshape(s, b, heads * dv)


def _allowed(attention_mask, mask_type, sq: int, sk: int, device) -> Optional[torch.Tensor]:
    """Which keys each query may see: megatron-core's mask inverted, or causal aligned bottom-right, so that
    decoding with a cache (sq < sk) sees every earlier key."""
    if attention_mask is not None:
        return ~attention_mask.bool()
    if mask_type == AttnMaskType.causal:
        return torch.ones(sq, sk, dtype=torch.bool, device=device).tril(diagonal=sk - sq)
    return None


def _causal_attention(q, k, v, dropout_p: float, scale: Optional[float]):
    """Causal SDPA through the fused (flash) kernel, which needs value heads as wide as query heads: MLA's
    narrower values are zero-padded and the padding sliced off (on 2 CPU cores, 2x faster forward + backward
    than the masked softmax path on the tiny/benchmark shapes)."""
    dv = v.shape[-1]
    if dv < q.shape[-1]:
        v = F.pad(v, (0, q.shape[-1] - dv))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p, scale=scale)
    return out[..., :dv]
