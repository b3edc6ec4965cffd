"""Which Hugging Face tensors make up each megatron-core model tensor (both directions of `dsv3-convert`).

The target layout comes from megatron-core itself: the model is built on the meta device (no memory) and its
`sharded_state_dict()` lists every checkpoint key, global shape and offset. A parameter whose factory splits it
(SwiGLU `linear_fc1` = [gate; up]) has one piece per Hugging Face tensor, so every Hugging Face tensor is
exactly one chunk of one megatron-core checkpoint tensor and can be written or read on its own.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

from megatron_dsv3.config import DSV3Config

# megatron-core local name (inside a decoder/MTP layer) -> Hugging Face name (inside model.layers.N).
_LAYER = {
    "input_layernorm.weight": ["input_layernorm.weight"],
    "pre_mlp_layernorm.weight": ["post_attention_layernorm.weight"],
    "self_attention.linear_q_proj.weight": ["self_attn.q_proj.weight"],
    "self_attention.linear_q_down_proj.weight": ["self_attn.q_a_proj.weight"],
    "self_attention.q_layernorm.weight": ["self_attn.q_a_layernorm.weight"],
    "self_attention.linear_q_up_proj.weight": ["self_attn.q_b_proj.weight"],
    "self_attention.linear_kv_down_proj.weight": ["self_attn.kv_a_proj_with_mqa.weight"],
    "self_attention.kv_layernorm.weight": ["self_attn.kv_a_layernorm.weight"],
    "self_attention.linear_kv_up_proj.weight": ["self_attn.kv_b_proj.weight"],
    "self_attention.linear_proj.weight": ["self_attn.o_proj.weight"],
    "mlp.linear_fc1.weight": ["mlp.gate_proj.weight", "mlp.up_proj.weight"],
    "mlp.linear_fc2.weight": ["mlp.down_proj.weight"],
    "mlp.router.weight": ["mlp.gate.weight"],
    "mlp.router.expert_bias": ["mlp.gate.e_score_correction_bias"],
    "mlp.shared_experts.linear_fc1.weight": ["mlp.shared_experts.gate_proj.weight", "mlp.shared_experts.up_proj.weight"],
    "mlp.shared_experts.linear_fc2.weight": ["mlp.shared_experts.down_proj.weight"],
}
_MTP = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight", "eh_proj.weight": "eh_proj.weight",
        "final_layernorm.weight": "shared_head.norm.weight"}
_TOP = {"embedding.word_embeddings.weight": "model.embed_tokens.weight", "output_layer.weight": "lm_head.weight",
        "decoder.final_layernorm.weight": "model.norm.weight"}
# Rows whose rope channels are reordered when the HF config says rope_interleave=False.
_ROPE_Q = ("self_attn.q_proj.weight", "self_attn.q_b_proj.weight")
_ROPE_KV = ("self_attn.kv_a_proj_with_mqa.weight",)
# 2-D weights DeepSeek keeps in high precision in its FP8 release (besides every 1-D tensor).
_NOT_FP8 = ("model.embed_tokens.weight", "lm_head.weight", "mlp.gate.weight", "embed_tokens.weight",
            "shared_head.head.weight")


@dataclass(frozen=True)
class Piece:
    """One Hugging Face tensor = one chunk (`template`'s offsets and local shape) of a checkpoint tensor."""

    hf_name: str
    template: ShardedTensor  # meta data; key, global_shape, global_offset, local_shape, prepend_axis_num
    rope: Optional[tuple[int, int, int]] = None  # (rows_per_head, rope_dim, heads) when rows are reordered

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.template.local_shape)

    @property
    def key(self) -> str:
        return self.template.key

    @property
    def offsets(self) -> tuple[int, ...]:
        return tuple(self.template.global_offset)

    @property
    def chunk_shape(self) -> tuple[int, ...]:
        """The chunk's shape in the global tensor (leading expert axis included)."""
        return (1,) * self.template.prepend_axis_num + self.shape


def quantized_in_fp8(hf_name: str, shape) -> bool:
    """True for the 2-D weights DeepSeek stores as E4M3 + weight_scale_inv (not norms, embeddings, head, gate)."""
    return len(shape) == 2 and hf_name.endswith(".weight") and "norm" not in hf_name \
        and not any(hf_name.endswith(n) for n in _NOT_FP8)


def hf_names_for(param: str, cfg: DSV3Config) -> list[str]:
    """Hugging Face tensor names (in piece order) for one megatron-core parameter name (TP=1, EP=1)."""
    if param in _TOP:
        return [_TOP[param]]
    parts = param.split(".")
    if parts[0] == "decoder" and parts[1] == "layers":
        return [f"model.layers.{parts[2]}.{n}" for n in _layer_names(".".join(parts[3:]), param)]
    if parts[0] == "mtp" and parts[1] == "layers":
        hf = f"model.layers.{cfg.num_hidden_layers + int(parts[2])}"
        rest = ".".join(parts[3:])
        if rest in _MTP:
            return [f"{hf}.{_MTP[rest]}"]
        if rest.startswith("mtp_model_layer."):
            return [f"{hf}.{n}" for n in _layer_names(rest[len("mtp_model_layer."):], param)]
    raise KeyError(f"no Hugging Face name is known for model tensor {param!r}")


def _layer_names(rest: str, param: str) -> list[str]:
    if rest in _LAYER:
        return _LAYER[rest]
    parts = rest.split(".")
    if parts[:3] == ["mlp", "experts", "local_experts"] and len(parts) == 6:
        e, inner = parts[3], ".".join(parts[4:])
        if inner == "linear_fc1.weight":
            return [f"mlp.experts.{e}.gate_proj.weight", f"mlp.experts.{e}.up_proj.weight"]
        if inner == "linear_fc2.weight":
            return [f"mlp.experts.{e}.down_proj.weight"]
    raise KeyError(f"no Hugging Face name is known for model tensor {param!r}")


def mtp_duplicates(cfg: DSV3Config) -> dict[str, str]:
    """The public checkpoint repeats the shared embedding and head in each MTP layer: HF name -> source HF name."""
    out = {}
    for k in range(cfg.num_nextn_predict_layers):
        hf = f"model.layers.{cfg.num_hidden_layers + k}"
        out[f"{hf}.embed_tokens.weight"] = "model.embed_tokens.weight"
        out[f"{hf}.shared_head.head.weight"] = "model.embed_tokens.weight" if cfg.tie_word_embeddings \
            else "lm_head.weight"
    return out


def build_template(cfg: DSV3Config):
    """(pieces in model order, sharded objects): the checkpoint layout of `cfg`, built on the meta device.

    Needs a one-stage parallel state (runtime.initialize(1, 1, 1)). `te` keys are the same as `local` ones: this
    project's spec keeps separate norms and uses SequentialMLP (moe_grouped_gemm=False) with both backends, so
    only the contents of `_extra_state` differ (None here; Transformer Engine accepts an empty extra state).
    """
    from megatron_dsv3.model.builder import build_model

    with torch.device("meta"):  # only names and shapes are read: nothing to initialise
        model = build_model(cfg, backend="local", perform_initialization=False)
    pieces, objects = [], []
    for name, item in model.sharded_state_dict().items():
        if isinstance(item, ShardedObject):
            objects.append(item)
            continue
        if isinstance(item, ShardedTensorFactory):
            parts = item.build()
            parts = list(parts.values()) if isinstance(parts, dict) else list(parts)
        elif isinstance(item, ShardedTensor):
            parts = [item]
        else:
            raise TypeError(f"unexpected sharded item {name!r} ({type(item).__name__})")
        names = hf_names_for(name, cfg)
        if len(names) != len(parts):
            raise ValueError(f"model tensor {name!r}: {len(parts)} checkpoint pieces for {len(names)} HF tensors")
        for hf_name, part in zip(names, parts):
            pieces.append(Piece(hf_name, part, _rope_of(hf_name, cfg)))
    return pieces, objects


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
