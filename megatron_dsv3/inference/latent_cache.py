"""MLA's absorbed latent KV cache and the cached (absorbed) attention / transformer-layer step.

Per layer and token the cache keeps only the kv_layernorm-ed latent c_KV (kv_lora_rank values) and the
rotated decoupled rope key (qk_rope_head_dim values). Keys and values are never materialised:

  score(i, t) = softmax_scale * ( (q_nope_i W_UK) . c_t  +  q_rope_i . k_rope_t )   per head
  out_i       = W_O [ W_UV (sum_t p(i, t) c_t) ]_heads

where W_UK / W_UV are the k_nope / v row blocks of `linear_kv_up_proj` for each head. The projections,
norms, rotary tables and MoE/dense MLPs are the model's own modules; only the attention arithmetic is
rewritten.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb


@dataclass
class LatentCache:
    """Preallocated per-layer buffers: latent[l] is [batch, capacity, kv_lora_rank], k_rope[l] is
    [batch, capacity, qk_rope_head_dim]; positions [0, length) are valid."""

    latent: list[torch.Tensor]
    k_rope: list[torch.Tensor]
    length: int = 0
    capacity: int = field(init=False)

    def __post_init__(self):
        self.capacity = self.latent[0].shape[1] if self.latent else 0

    @classmethod
    def allocate(cls, num_layers: int, batch: int, capacity: int, kv_lora_rank: int, rope_dim: int,
                 dtype=torch.float32, device=None) -> "LatentCache":
        return cls(
            latent=[torch.zeros(batch, capacity, kv_lora_rank, dtype=dtype, device=device) for _ in range(num_layers)],
            k_rope=[torch.zeros(batch, capacity, rope_dim, dtype=dtype, device=device) for _ in range(num_layers)],
        )

    @property
    def num_layers(self) -> int:
        return len(self.latent)

    def values_per_token_per_layer(self) -> int:
        return self.latent[0].shape[-1] + self.k_rope[0].shape[-1] if self.latent else 0

    def bytes_per_token(self) -> int:
        """Bytes one token occupies in this cache, all layers, one sequence."""
        return sum(a.shape[-1] * a.element_size() + b.shape[-1] * b.element_size()
                   for a, b in zip(self.latent, self.k_rope))

    def truncate(self, length: int) -> None:
        """Forget every position >= length (used to roll back rejected speculative tokens)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"truncate: length {length} outside [0, {self.length}]")
        self.length = length


def _out(result):
    """Megatron linears return (output, bias); fold the bias in when there is one."""
    if isinstance(result, tuple):
        out, bias = result[0], result[1] if len(result) > 1 else None
        return out if bias is None else out + bias
    return result


class RotaryTable:
    """The attention module's own rotary frequencies (RoPE or YaRN) computed once for `capacity` positions."""

    def __init__(self, attention, capacity: int):
        emb = attention.rotary_pos_emb(capacity)
        if isinstance(emb, tuple):  # YaRN returns (freqs, mscale)
            self.freqs, self.mscale = emb[0], float(emb[1])
        else:
            self.freqs, self.mscale = emb, 1.0
        self.config = attention.config
        self.cp_group = attention.pg_collection.cp

    def apply(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Rotate x [s, b, heads, rope_dim] for absolute positions start..start+s-1 (interleaved pairs, as MLA)."""
        freqs = self.freqs[start : start + x.shape[0]]
        return apply_rotary_pos_emb(x, freqs, config=self.config, mscale=self.mscale, cp_group=self.cp_group,
                                    mla_rotary_interleaved=True)


class AbsorbedMLA:
    """Absorbed-form cached attention for one megatron-core MLA self-attention module (TP=1)."""

    def __init__(self, attention, capacity: int):
        cfg = attention.config
        if getattr(attention, "num_attention_heads_per_partition", cfg.num_attention_heads) != cfg.num_attention_heads:
            raise ValueError("tensor_model_parallel_size: the latent-cache engine runs with TP=1 only")
        self.attn = attention
        self.heads = cfg.num_attention_heads
        self.nope, self.rope, self.vdim = cfg.qk_head_dim, cfg.qk_pos_emb_head_dim, cfg.v_head_dim
        self.rank = cfg.kv_lora_rank
        self.q_lora = cfg.q_lora_rank
        self.scale = attention.softmax_scale
        up = attention.linear_kv_up_proj
        if getattr(up, "bias", None) is not None and up.bias.numel():
            raise ValueError("linear_kv_up_proj: a bias cannot be absorbed into the latent query")
        w = up.weight.view(self.heads, self.nope + self.vdim, self.rank)
        self.w_uk = w[:, : self.nope]   # [heads, nope, rank]: k_nope = W_UK c
        self.w_uv = w[:, self.nope :]   # [heads, vdim, rank]: v = W_UV c
        self.rotary = RotaryTable(attention, capacity)

    def __call__(self, x: torch.Tensor, cache: LatentCache, layer: int, start: int) -> torch.Tensor:
        """x: the layer's normalised input [s, b, hidden] for positions start..start+s-1; writes their latent
        and rope key into `cache` (layer `layer`) and returns the attention output [s, b, hidden]."""
        a, s, b = self.attn, x.shape[0], x.shape[1]
        if self.q_lora is not None:
            q = _out(a.linear_q_up_proj(a.q_layernorm(_out(a.linear_q_down_proj(x)))))
        else:
            q = _out(a.linear_q_proj(x))
        q = q.view(s, b, self.heads, self.nope + self.rope)
        q_nope, q_rope = q[..., : self.nope], q[..., self.nope :]
        q_rope = self.rotary.apply(q_rope, start)

        kv = _out(a.linear_kv_down_proj(x))
        latent = a.kv_layernorm(kv[..., : self.rank])
        k_rope = self.rotary.apply(kv[..., self.rank :].unsqueeze(2), start).squeeze(2)

        end = start + s
        if end > cache.capacity:
            raise ValueError(f"cache capacity {cache.capacity} exceeded (need {end} positions)")
        cache.latent[layer][:, start:end] = latent.transpose(0, 1)
        cache.k_rope[layer][:, start:end] = k_rope.transpose(0, 1)
        c_all = cache.latent[layer][:, :end]   # [b, t, rank]
        r_all = cache.k_rope[layer][:, :end]   # [b, t, rope]

        q_latent = torch.einsum("sbhd,hdr->bhsr", q_nope, self.w_uk)
        scores = torch.einsum("bhsr,btr->bhst", q_latent, c_all)
        scores = scores + torch.einsum("sbhd,btd->bhst", q_rope, r_all)
        scores = scores * self.scale
        if s > 1:  # a single new token sees every cached position: no mask to build
            pos_q = torch.arange(start, end, device=x.device).unsqueeze(1)
            pos_k = torch.arange(end, device=x.device).unsqueeze(0)
            scores = scores.masked_fill(pos_k > pos_q, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(c_all.dtype)
        ctx_latent = torch.einsum("bhst,btr->sbhr", probs, c_all)
        ctx = torch.einsum("sbhr,hvr->sbhv", ctx_latent, self.w_uv).reshape(s, b, self.heads * self.vdim)
        return _out(a.linear_proj(ctx))


class CachedLayer:
    """One megatron-core TransformerLayer (pre-norm MLA + dense/MoE MLP) stepped with the latent cache."""

    def __init__(self, layer, capacity: int):
        if layer.config.apply_residual_connection_post_layernorm:
            raise ValueError("apply_residual_connection_post_layernorm is not DeepSeek-V3's layout")
        self.layer = layer
        self.attention = AbsorbedMLA(layer.self_attention, capacity)

    def __call__(self, h: torch.Tensor, cache: LatentCache, index: int, start: int) -> torch.Tensor:
        layer = self.layer
        h = h + self.attention(layer.input_layernorm(h), cache, index, start)
        return h + _out(layer.mlp(layer.pre_mlp_layernorm(h)))
