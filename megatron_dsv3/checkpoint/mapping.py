"""Which Hugging Face tensors make up each megatron-core checkpoint tensor (both directions of `dsv3-convert`).

The layout is what megatron-core's `sharded_state_dict()` of this project's model lists at TP=PP=EP=1 (every
checkpoint key, global shape and chunk offset; tests compare the two on several configs), written out here
so the converter runs without importing megatron-core. A tensor that megatron-core splits (SwiGLU
`linear_fc1` = [gate; up], the experts stacked on a leading axis) has one piece per Hugging Face tensor, so
every Hugging Face tensor is exactly one chunk of one checkpoint tensor and can be written or read on its own.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_dsv3.config import DSV3Config

# Rows whose rope channels are reordered when the HF config says rope_interleave=False.
_ROPE_Q = ("self_attn.q_proj.weight", "self_attn.q_b_proj.weight")
_ROPE_KV = ("self_attn.kv_a_proj_with_mqa.weight",)
# 2-D weights DeepSeek keeps in high precision in its FP8 release (besides every 1-D tensor).
_NOT_FP8 = ("model.embed_tokens.weight", "lm_head.weight", "mlp.gate.weight", "embed_tokens.weight",
            "shared_head.head.weight")


@dataclass(frozen=True)
class Piece:
    """One Hugging Face tensor = one chunk (at `offsets`, of `shape`) of the checkpoint tensor `key`."""

    hf_name: str
    key: str
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    shape: tuple[int, ...]  # the Hugging Face tensor's shape
    rope: Optional[tuple[int, int, int]] = None  # (rows_per_head, rope_dim, heads) when rows are reordered

    @property
    def chunk_shape(self) -> tuple[int, ...]:
        """The chunk's shape in the global tensor (a leading expert axis of size 1 included)."""
        return (1,) * (len(self.global_shape) - len(self.shape)) + self.shape


def quantized_in_fp8(hf_name: str, shape) -> bool:
    """True for the 2-D weights DeepSeek stores as E4M3 + weight_scale_inv (not norms, embeddings, head, gate)."""
    return len(shape) == 2 and hf_name.endswith(".weight") and "norm" not in hf_name \
        and not any(hf_name.endswith(n) for n in _NOT_FP8)


def mtp_duplicates(cfg: DSV3Config) -> dict[str, str]:
    """The public checkpoint repeats the shared embedding and head in each MTP layer: HF name -> source HF name."""
    out = {}
    for k in range(cfg.num_nextn_predict_layers):
        hf = f"model.layers.{cfg.num_hidden_layers + k}"
        out[f"{hf}.embed_tokens.weight"] = "model.embed_tokens.weight"
        out[f"{hf}.shared_head.head.weight"] = "model.embed_tokens.weight" if cfg.tie_word_embeddings \
            else "lm_head.weight"
    return out


def checkpoint_layout(cfg: DSV3Config) -> tuple[list[Piece], list[str]]:
    """(pieces in megatron-core's order, unique keys of the linears' `_extra_state` objects) for `cfg`.

    `te` keys equal `local` ones: this project's spec keeps separate norms and uses SequentialMLP with both
    backends, so only the contents of `_extra_state` differ (empty here; Transformer Engine accepts that).
    """
    out = _Layout(cfg)
    out.tensor("embedding.word_embeddings.weight", "model.embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size))
    for i, moe in enumerate(cfg.moe_layer_pattern):
        out.layer(f"decoder.layers.{i}", f"model.layers.{i}", moe)
    out.tensor("decoder.final_layernorm.weight", "model.norm.weight", (cfg.hidden_size,))
    for k in range(cfg.num_nextn_predict_layers):
        key, hf = f"mtp.layers.{k}", f"model.layers.{cfg.num_hidden_layers + k}"
        out.tensor(f"{key}.enorm.weight", f"{hf}.enorm.weight", (cfg.hidden_size,))
        out.tensor(f"{key}.hnorm.weight", f"{hf}.hnorm.weight", (cfg.hidden_size,))
        out.linear(f"{key}.eh_proj", [f"{hf}.eh_proj.weight"], (cfg.hidden_size, 2 * cfg.hidden_size))
        out.layer(f"{key}.transformer_layer", hf, cfg.n_routed_experts > 0)
        out.tensor(f"{key}.final_layernorm.weight", f"{hf}.shared_head.norm.weight", (cfg.hidden_size,))
    if not cfg.tie_word_embeddings:
        out.tensor("output_layer.weight", "lm_head.weight", (cfg.vocab_size, cfg.hidden_size))
    return out.pieces, out.objects


class _Layout:
    """Collects pieces and `_extra_state` keys in the order megatron-core's modules list them."""

    def __init__(self, cfg: DSV3Config):
        self.cfg, self.pieces, self.objects = cfg, [], []

    def tensor(self, key: str, hf_name: str, shape: tuple[int, ...]) -> None:
        self.pieces.append(Piece(hf_name, key, shape, (0,) * len(shape), shape, _rope_of(hf_name, self.cfg)))

    def linear(self, prefix: str, hf_names: list[str], shape: tuple[int, int], experts: int = 0,
               index: int = 0) -> None:
        """A linear's weight (the HF tensors stacked along rows; expert `index` of `experts` on a leading axis)
        and its `_extra_state` object."""
        rows = shape[0] * len(hf_names)
        for j, hf_name in enumerate(hf_names):
            offsets, global_shape = (j * shape[0], 0), (rows, shape[1])
            if experts:
                offsets, global_shape = (index, *offsets), (experts, *global_shape)
            self.pieces.append(Piece(hf_name, f"{prefix}.weight", global_shape, offsets, shape,
                                     _rope_of(hf_name, self.cfg)))
        self.objects.append(f"{prefix}._extra_state/shard_{index}_{max(experts, 1)}")

    def layer(self, key: str, hf: str, moe: bool) -> None:
        c, h = self.cfg, self.cfg.hidden_size
        attn, hf_attn = f"{key}.self_attention", f"{hf}.self_attn"
        self.tensor(f"{key}.input_layernorm.weight", f"{hf}.input_layernorm.weight", (h,))
        linears = [("linear_proj", "o_proj", (h, c.num_attention_heads * c.v_head_dim))]
        q_rows = c.num_attention_heads * c.qk_head_dim
        if c.q_lora_rank is None:
            linears.append(("linear_q_proj", "q_proj", (q_rows, h)))
        else:
            linears += [("linear_q_down_proj", "q_a_proj", (c.q_lora_rank, h)),
                        ("linear_q_up_proj", "q_b_proj", (q_rows, c.q_lora_rank))]
        linears += [("linear_kv_down_proj", "kv_a_proj_with_mqa", (c.kv_lora_rank + c.qk_rope_head_dim, h)),
                    ("linear_kv_up_proj", "kv_b_proj",
                     (c.num_attention_heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank))]
        for name, hf_name, shape in linears:
            self.linear(f"{attn}.{name}", [f"{hf_attn}.{hf_name}.weight"], shape)
        if c.q_lora_rank is not None:
            self.tensor(f"{attn}.q_layernorm.weight", f"{hf_attn}.q_a_layernorm.weight", (c.q_lora_rank,))
        self.tensor(f"{attn}.kv_layernorm.weight", f"{hf_attn}.kv_a_layernorm.weight", (c.kv_lora_rank,))
        self.tensor(f"{key}.pre_mlp_layernorm.weight", f"{hf}.post_attention_layernorm.weight", (h,))
        if not moe:
            self.mlp(f"{key}.mlp", f"{hf}.mlp", c.intermediate_size)
            return
        e = c.n_routed_experts
        self.tensor(f"{key}.mlp.router.weight", f"{hf}.mlp.gate.weight", (e, h))
        self.tensor(f"{key}.mlp.router.expert_bias", f"{hf}.mlp.gate.e_score_correction_bias", (e,))
        experts = f"{key}.mlp.experts.experts"
        for i in range(e):
            self.mlp(experts, f"{hf}.mlp.experts.{i}", c.moe_intermediate_size, experts=e, index=i)
        if c.n_shared_experts:
            self.mlp(f"{key}.mlp.shared_experts", f"{hf}.mlp.shared_experts",
                     c.n_shared_experts * c.moe_intermediate_size)

    def mlp(self, key: str, hf: str, ffn: int, experts: int = 0, index: int = 0) -> None:
        """SwiGLU: linear_fc1 = [gate; up], linear_fc2 = down (one expert of a stacked set when `experts`)."""
        h = self.cfg.hidden_size
        self.linear(f"{key}.linear_fc1", [f"{hf}.gate_proj.weight", f"{hf}.up_proj.weight"], (ffn, h), experts, index)
        self.linear(f"{key}.linear_fc2", [f"{hf}.down_proj.weight"], (h, ffn), experts, index)


def _rope_of(hf_name: str, cfg: DSV3Config):
    if hf_name.endswith(_ROPE_Q):
        return (cfg.qk_head_dim, cfg.qk_rope_head_dim, cfg.num_attention_heads)
    if hf_name.endswith(_ROPE_KV):
        return (cfg.kv_lora_rank + cfg.qk_rope_head_dim, cfg.qk_rope_head_dim, 1)
    return None


def rope_order(rows_per_head: int, rope_dim: int, heads: int, to_interleaved: bool) -> torch.Tensor:
    """Row permutation between rotate-half and interleaved rope rows (the inverse when to_interleaved=False)."""
    half = rope_dim // 2
    inner = torch.stack([torch.arange(half), torch.arange(half, rope_dim)], dim=1).flatten()
    if not to_interleaved:
        inner = torch.argsort(inner)
    head = torch.cat([torch.arange(rows_per_head - rope_dim), rows_per_head - rope_dim + inner])
    return torch.cat([h * rows_per_head + head for h in range(heads)])
