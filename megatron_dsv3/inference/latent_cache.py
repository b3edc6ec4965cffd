"""MLA's absorbed latent KV cache and the cached (absorbed) attention / transformer-layer step.

Per layer and token the cache keeps only the kv_layernorm-ed latent c_KV (kv_lora_rank values) and the
rotated decoupled rope key (qk_rope_head_dim values). Keys and values are never materialised:

  score(i, t) = softmax_scale * ( (q_nope_i W_UK) . c_t  +  q_rope_i . k_rope_t )   per head
  out_i       = W_O [ W_UV (sum_t p(i, t) c_t) ]_heads

where W_UK / W_UV are the k_nope / v row blocks of `linear_kv_up_proj` for each head. The projections,
norms and rotary tables are the model's own modules, its linears and MLPs read through `plain_modules`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

from megatron_dsv3.inference.plain_modules import plain_feed_forward, plain_linear, plain_norm


@dataclass
class LatentCache:
    """Preallocated per-layer buffers: keys[l] is [batch, capacity, kv_lora_rank + qk_rope_head_dim], the
    latent c_KV then the rope key of each position, so one matmul scores a query against both; latent[l] and
    k_rope[l] are views of its two parts. Positions [0, length) are valid."""

    keys: list[torch.Tensor]
    rank: int
    length: int = 0
    capacity: int = field(init=False)
    latent: list[torch.Tensor] = field(init=False)
    k_rope: list[torch.Tensor] = field(init=False)

    def __post_init__(self):
        self.capacity = self.keys[0].shape[1] if self.keys else 0
        self.latent = [k[..., : self.rank] for k in self.keys]
        self.k_rope = [k[..., self.rank :] for k in self.keys]

    @classmethod
    def allocate(cls, num_layers: int, batch: int, capacity: int, kv_lora_rank: int, rope_dim: int,
                 dtype=torch.float32, device=None) -> "LatentCache":
        return cls([torch.zeros(batch, capacity, kv_lora_rank + rope_dim, dtype=dtype, device=device)
                    for _ in range(num_layers)], kv_lora_rank)

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


class RotaryTable:
    """The attention module's own rotary frequencies (RoPE or YaRN) for `capacity` positions, with their
    cosines and sines computed once; rotates as megatron-core's MLA rope does (interleaved pairs)."""

    def __init__(self, attention, capacity: int, dtype: torch.dtype):
        emb = attention.rotary_pos_emb(capacity)
        if isinstance(emb, tuple):  # YaRN returns (freqs, mscale)
            self.freqs, self.mscale = emb[0], float(emb[1])
        else:
            self.freqs, self.mscale = emb, 1.0
        self.config = attention.config
        self.cp_group = attention.pg_collection.cp
        self.own = not (self.config.rotary_interleaved or self.config.apply_rope_fusion)
        self.cos = (torch.cos(self.freqs) * self.mscale).to(dtype)  # [capacity, 1, 1, rope_dim]
        self.sin = (torch.sin(self.freqs) * self.mscale).to(dtype)
        half = self.sin.shape[-1] // 2  # rotate-half as a roll: cat(-x2, x1) * sin == roll(x) * cat(-sin1, sin2)
        self.signed_sin = torch.cat((-self.sin[..., :half], self.sin[..., half:]), dim=-1)

    def apply(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Rotate x [s, b, heads, rope_dim] for absolute positions start..start+s-1."""
        end = start + x.shape[0]
        if not self.own:
            return apply_rotary_pos_emb(x, self.freqs[start:end], config=self.config, mscale=self.mscale,
                                        cp_group=self.cp_group, mla_rotary_interleaved=True)
        s, dim = x.shape[0], x.shape[-1]
        x = x.view(*x.shape[:-1], dim // 2, 2).transpose(-1, -2).reshape(x.shape)  # evens, then odds
        return x * self.cos.narrow(0, start, s) + x.roll(dim // 2, dims=-1) * self.signed_sin.narrow(0, start, s)


class AbsorbedMLA:
    """Absorbed-form cached attention for one megatron-core MLA self-attention module (TP=1)."""

    def __init__(self, attention, capacity: int):
        cfg = attention.config
        if getattr(attention, "num_attention_heads_per_partition", cfg.num_attention_heads) != cfg.num_attention_heads:
            raise ValueError("tensor_model_parallel_size: the latent-cache engine runs with TP=1 only")
        self.heads = cfg.num_attention_heads
        self.nope, self.rope, self.vdim = cfg.qk_head_dim, cfg.qk_pos_emb_head_dim, cfg.v_head_dim
        self.rank = cfg.kv_lora_rank
        self.q_lora = cfg.q_lora_rank
        self.scale = attention.softmax_scale
        up = attention.linear_kv_up_proj
        if getattr(up, "bias", None) is not None and up.bias.numel():
            raise ValueError("linear_kv_up_proj: a bias cannot be absorbed into the latent query")
        w = up.weight.view(self.heads, self.nope + self.vdim, self.rank)
        self.w_uk = w[:, : self.nope]               # [heads, nope, rank]: k_nope = W_UK c
        self.w_uv_t = w[:, self.nope :].transpose(1, 2)  # [heads, rank, vdim]: v = W_UV c
        self.rotary = RotaryTable(attention, capacity, attention.linear_kv_down_proj.weight.dtype)
        if self.q_lora is not None:
            q_down, q_up = plain_linear(attention.linear_q_down_proj), plain_linear(attention.linear_q_up_proj)
            q_norm = plain_norm(attention.q_layernorm)
            self.query = lambda x: q_up(q_norm(q_down(x)))
        else:
            self.query = plain_linear(attention.linear_q_proj)
        self.kv_down, self.proj = plain_linear(attention.linear_kv_down_proj), plain_linear(attention.linear_proj)
        self.kv_norm = plain_norm(attention.kv_layernorm)
        self._masks: dict[int, torch.Tensor] = {}

    def _future(self, s: int, device) -> torch.Tensor:
        """[s, s] mask of the later new tokens each new token must not see (kept for the narrow widths that
        verification steps repeat; a long prompt's is built once and dropped)."""
        mask = self._masks.get(s)
        if mask is None:
            mask = torch.ones(s, s, dtype=torch.bool, device=device).triu(1)
            if s <= 64:
                self._masks[s] = mask
        return mask

    def __call__(self, x: torch.Tensor, cache: LatentCache, layer: int, start: int,
                 last_only: bool = False) -> torch.Tensor:
        """x: the layer's normalised input [s, b, hidden] for positions start..start+s-1; writes their latent
        and rope key into `cache` (layer `layer`) and returns the attention output [s, b, hidden], or with
        `last_only` only the last position's [1, b, hidden]: the others are keys and nothing else."""
        s, b, h = x.shape[0], x.shape[1], self.heads
        end = start + s
        if end > cache.capacity:
            raise ValueError(f"cache capacity {cache.capacity} exceeded (need {end} positions)")
        n = 1 if last_only else s                                                 # positions that query
        q = self.query(x if n == s else x.narrow(0, s - 1, 1)).view(n, b, h, self.nope + self.rope)
        kv = self.kv_down(x)
        q_rope, k_rope = q.narrow(-1, self.nope, self.rope), kv.narrow(-1, self.rank, self.rope).unsqueeze(2)
        if n == s:  # the heads' rope queries and the shared rope key rotate together: [s, b, heads + 1, rope]
            rotated = self.rotary.apply(torch.cat([q_rope, k_rope], dim=2), start)
            q_rope, k_rope = rotated.narrow(2, 0, h), rotated.select(2, h)
        else:
            q_rope, k_rope = self.rotary.apply(q_rope, end - n), self.rotary.apply(k_rope, start).squeeze(2)
        keys = cache.keys[layer]
        new_keys = torch.cat([self.kv_norm(kv.narrow(-1, 0, self.rank)), k_rope], dim=-1)
        keys.narrow(1, start, s).copy_(new_keys.transpose(0, 1))
        seen = keys.narrow(1, 0, end)                                             # [b, t, rank + rope]

        # The query in latent space per head, (q_nope W_UK, rotated q_rope), as rows (b, head, position).
        q_latent = torch.bmm(q.narrow(-1, 0, self.nope).reshape(n * b, h, self.nope).transpose(0, 1), self.w_uk)
        q_latent = q_latent.view(h, n, b, self.rank).permute(2, 0, 1, 3)         # [b, h, n, rank]
        query = torch.cat([q_latent, q_rope.permute(1, 2, 0, 3)], dim=-1).reshape(b, h * n, self.rank + self.rope)
        scores = torch.bmm(query, seen.transpose(1, 2)) * self.scale             # [b, h * n, t]
        if n > 1:  # the new tokens see every cached position and each other causally
            scores.view(b, h, n, end).narrow(-1, end - n, n).masked_fill_(self._future(n, x.device), float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
        if probs.dtype != seen.dtype:
            probs = probs.to(seen.dtype)
        ctx_latent = torch.bmm(probs, seen.narrow(-1, 0, self.rank))              # [b, h * n, rank]
        ctx_latent = ctx_latent.view(b, h, n, self.rank).permute(1, 2, 0, 3).reshape(h, n * b, self.rank)
        ctx = torch.bmm(ctx_latent, self.w_uv_t)                                 # [h, n * b, vdim]
        return self.proj(ctx.transpose(0, 1).reshape(n, b, h * self.vdim))


class CachedLayer:
    """One megatron-core TransformerLayer (pre-norm MLA + dense/MoE MLP) stepped with the latent cache."""

    def __init__(self, layer, capacity: int):
        if layer.config.apply_residual_connection_post_layernorm:
            raise ValueError("apply_residual_connection_post_layernorm is not DeepSeek-V3's layout")
        self.input_norm, self.pre_mlp_norm = plain_norm(layer.input_layernorm), plain_norm(layer.pre_mlp_layernorm)
        self.attention = AbsorbedMLA(layer.self_attention, capacity)
        self.feed_forward = plain_feed_forward(layer.mlp)

    def __call__(self, h: torch.Tensor, cache: LatentCache, index: int, start: int,
                 last_only: bool = False) -> torch.Tensor:
        """The layer over positions start.. (h [s, b, hidden]); with `last_only`, the earlier positions only get
        their cache entries and the output is the last position's [1, b, hidden]."""
        attended = self.attention(self.input_norm(h), cache, index, start, last_only=last_only)
        h = (h if attended.shape[0] == h.shape[0] else h.narrow(0, h.shape[0] - 1, 1)) + attended
        return h + self.feed_forward(self.pre_mlp_norm(h))
