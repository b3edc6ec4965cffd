"""Hugging Face DeepSeek-V3 config and weights -> megatron-core names (local backend).

Accepts the public checkpoint's per-expert tensors (`mlp.experts.E.gate_proj.weight`) and the fused layout
transformers 5 keeps in memory (`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I]).
The MTP module is stored as decoder layer `num_hidden_layers` (61 in V3) with enorm/hnorm/eh_proj/shared_head.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from megatron_dsv3.checkpoint.errors import all_finite
from megatron_dsv3.checkpoint.mapping import rope_order
from megatron_dsv3.config import TOPK_METHODS, DSV3Config, YarnConfig

_SUPPORTED_ROPE = ("default", "yarn")


def _get(hf_config: Any, name: str, default=None):
    if isinstance(hf_config, Mapping):
        return hf_config.get(name, default)
    return getattr(hf_config, name, default)


def _float(hf_config: Any, name: str, default=None) -> float:
    """A number from the config, or a ValueError naming the field."""
    value = _get(hf_config, name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}: expected a number, got {value!r}")
    return float(value)


def _yarn_from_hf(hf_config: Any) -> YarnConfig | None:
    rope = _get(hf_config, "rope_parameters") or _get(hf_config, "rope_scaling") or {}
    if not isinstance(rope, Mapping):
        raise ValueError(f"rope_scaling: expected a mapping of YaRN parameters or null, got {type(rope).__name__} "
                         f"{rope!r}")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in _SUPPORTED_ROPE:
        raise ValueError(f"rope_parameters.rope_type: expected one of {_SUPPORTED_ROPE}, got {rope_type!r}")
    if rope_type == "default":
        return None
    if rope.get("truncate") is False:
        raise ValueError("rope_parameters.truncate: only truncate=True (DeepSeek's YaRN) is supported")
    original = rope.get("original_max_position_embeddings") or _get(hf_config, "max_position_embeddings")
    factor = rope.get("factor") or _get(hf_config, "max_position_embeddings") / original
    return YarnConfig(
        factor=float(factor),
        original_max_position_embeddings=int(original),
        beta_fast=float(rope.get("beta_fast") or 32),
        beta_slow=float(rope.get("beta_slow") or 1),
        mscale=rope.get("mscale"),
        mscale_all_dim=rope.get("mscale_all_dim"),
        attention_factor=rope.get("attention_factor"),
    )


def _topk_method(hf_config) -> str:
    """DeepSeek's `topk_method` (V3 configs say noaux_tc; V2 says group_limited_greedy or greedy)."""
    method = _get(hf_config, "topk_method", "noaux_tc")
    if method not in TOPK_METHODS:
        raise ValueError(f"topk_method: expected one of {', '.join(TOPK_METHODS)}, got {method!r}")
    return method


def config_from_hf(hf_config: Any, **overrides) -> DSV3Config:
    """DSV3Config from a `transformers.DeepseekV3Config` or a DeepSeek `config.json` dict."""
    if _get(hf_config, "attention_bias", False):
        raise ValueError("attention_bias: DeepSeek-V3 attention has no biases; attention_bias=True is unsupported")
    if _get(hf_config, "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act: expected 'silu', got {_get(hf_config, 'hidden_act')!r}")
    try:
        return _config_from_hf(hf_config, overrides)
    except TypeError as err:  # e.g. float(None) for a missing rms_norm_eps
        raise ValueError(f"config.json: {err}") from None


def _config_from_hf(hf_config: Any, overrides: dict) -> DSV3Config:
    rope = _get(hf_config, "rope_parameters") or {}
    rope = rope if isinstance(rope, Mapping) else {}
    mtp_layers = _get(hf_config, "num_nextn_predict_layers", _get(hf_config, "num_mtp_layers", 0))
    fields = dict(
        vocab_size=_get(hf_config, "vocab_size"),
        hidden_size=_get(hf_config, "hidden_size"),
        intermediate_size=_get(hf_config, "intermediate_size"),
        moe_intermediate_size=_get(hf_config, "moe_intermediate_size"),
        num_hidden_layers=_get(hf_config, "num_hidden_layers"),
        num_attention_heads=_get(hf_config, "num_attention_heads"),
        q_lora_rank=_get(hf_config, "q_lora_rank"),
        kv_lora_rank=_get(hf_config, "kv_lora_rank"),
        qk_nope_head_dim=_get(hf_config, "qk_nope_head_dim"),
        qk_rope_head_dim=_get(hf_config, "qk_rope_head_dim"),
        v_head_dim=_get(hf_config, "v_head_dim"),
        n_shared_experts=_get(hf_config, "n_shared_experts") or 0,
        n_routed_experts=_get(hf_config, "n_routed_experts") or 0,
        num_experts_per_tok=_get(hf_config, "num_experts_per_tok"),
        n_group=_get(hf_config, "n_group") or 1,
        topk_group=_get(hf_config, "topk_group") or 1,
        routed_scaling_factor=_float(hf_config, "routed_scaling_factor", 1.0),
        norm_topk_prob=bool(_get(hf_config, "norm_topk_prob", True)),
        scoring_func=_get(hf_config, "scoring_func", "sigmoid"),
        topk_method=_topk_method(hf_config),
        first_k_dense_replace=_get(hf_config, "first_k_dense_replace") or 0,
        num_nextn_predict_layers=mtp_layers or 0,
        rms_norm_eps=_float(hf_config, "rms_norm_eps"),
        rope_theta=float(rope.get("rope_theta") or _get(hf_config, "rope_theta", 10000.0)),
        max_position_embeddings=_get(hf_config, "max_position_embeddings"),
        rope_scaling=_yarn_from_hf(hf_config),
        initializer_range=_float(hf_config, "initializer_range", 0.006),
        tie_word_embeddings=bool(_get(hf_config, "tie_word_embeddings", False)),
    )
    fields.update(overrides)
    return DSV3Config(**fields)


def rope_to_interleaved(weight: torch.Tensor, rows_per_head: int, rope_dim: int, heads: int) -> torch.Tensor:
    """Reorder each head's trailing `rope_dim` output rows from rotate-half layout to DeepSeek's interleaved pairs.

    megatron-core's MLA always reads the rope channels as interleaved pairs (x0, x1), (x2, x3), ... as the
    public checkpoint stores them (`mla_rotary_interleaved`); a HF config with rope_interleave=False holds
    them as halves (x_i, x_{i+d/2}), so those rows are interleaved on import.
    """
    return weight[rope_order(rows_per_head, rope_dim, heads, to_interleaved=True)]


class _Source:
    """The HF tensors, tracking which were consumed so leftovers can be reported."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor]):
        self.tensors, self.used = state_dict, set()

    def has(self, name: str) -> bool:
        return name in self.tensors

    def take(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            raise ValueError(f"Hugging Face state dict: missing tensor {name!r}")
        self.used.add(name)
        return self.tensors[name]


def _attention(src: _Source, hf: str, cfg: DSV3Config, interleaved: bool) -> dict[str, torch.Tensor]:
    heads, rope = cfg.num_attention_heads, cfg.qk_rope_head_dim
    fix_q = (lambda w: w) if interleaved else (lambda w: rope_to_interleaved(w, cfg.qk_head_dim, rope, heads))
    fix_kv = (lambda w: w) if interleaved else (lambda w: rope_to_interleaved(w, w.shape[0], rope, 1))
    out = {}
    if cfg.q_lora_rank is None:
        out["linear_q_proj.weight"] = fix_q(src.take(f"{hf}.q_proj.weight"))
    else:
        out["linear_q_down_proj.weight"] = src.take(f"{hf}.q_a_proj.weight")
        out["q_layernorm.weight"] = src.take(f"{hf}.q_a_layernorm.weight")
        out["linear_q_up_proj.weight"] = fix_q(src.take(f"{hf}.q_b_proj.weight"))
    out["linear_kv_down_proj.weight"] = fix_kv(src.take(f"{hf}.kv_a_proj_with_mqa.weight"))
    out["kv_layernorm.weight"] = src.take(f"{hf}.kv_a_layernorm.weight")
    out["linear_kv_up_proj.weight"] = src.take(f"{hf}.kv_b_proj.weight")
    out["linear_proj.weight"] = src.take(f"{hf}.o_proj.weight")
    return out


def _swiglu(src: _Source, hf: str) -> dict[str, torch.Tensor]:
    """gate and up stacked into megatron-core's fused fc1 (the first half goes through SiLU)."""
    return {
        "linear_fc1.weight": torch.cat([src.take(f"{hf}.gate_proj.weight"), src.take(f"{hf}.up_proj.weight")]),
        "linear_fc2.weight": src.take(f"{hf}.down_proj.weight"),
    }


def _experts(src: _Source, hf: str, cfg: DSV3Config) -> dict[str, torch.Tensor]:
    from megatron.core import parallel_state

    ep_size = parallel_state.get_expert_model_parallel_world_size()
    local = cfg.n_routed_experts // ep_size
    first = parallel_state.get_expert_model_parallel_rank() * local
    fused = src.has(f"{hf}.gate_up_proj")
    if fused:
        gate_up, down = src.take(f"{hf}.gate_up_proj"), src.take(f"{hf}.down_proj")
    out = {}
    for i in range(local):
        e = first + i
        if fused:
            weights = {"linear_fc1.weight": gate_up[e], "linear_fc2.weight": down[e]}
        else:
            weights = _swiglu(src, f"{hf}.{e}")
        out.update({f"local_experts.{i}.{k}": v for k, v in weights.items()})
    if not fused and ep_size > 1:  # other ranks' experts are not this rank's to load, but are expected
        src.used.update(n for n in src.tensors if n.startswith(f"{hf}."))
    return out


def _layer(src: _Source, hf: str, cfg: DSV3Config, moe: bool, interleaved: bool) -> dict[str, torch.Tensor]:
    out = {"input_layernorm.weight": src.take(f"{hf}.input_layernorm.weight"),
           "pre_mlp_layernorm.weight": src.take(f"{hf}.post_attention_layernorm.weight")}
    out.update({f"self_attention.{k}": v for k, v in _attention(src, f"{hf}.self_attn", cfg, interleaved).items()})
    if not moe:
        out.update({f"mlp.{k}": v for k, v in _swiglu(src, f"{hf}.mlp").items()})
        return out
    out["mlp.router.weight"] = src.take(f"{hf}.mlp.gate.weight")
    if cfg.scoring_func == "sigmoid":
        out["mlp.router.expert_bias"] = src.take(f"{hf}.mlp.gate.e_score_correction_bias")
    out.update({f"mlp.experts.{k}": v for k, v in _experts(src, f"{hf}.mlp.experts", cfg).items()})
    if cfg.n_shared_experts:
        out.update({f"mlp.shared_experts.{k}": v for k, v in _swiglu(src, f"{hf}.mlp.shared_experts").items()})
    return out


def hf_to_mcore(hf_state_dict: Mapping[str, torch.Tensor], cfg: DSV3Config, *, rope_interleave: bool = True,
                pre_process: bool = True, post_process: bool = True, layer_offset: int = 0,
                num_local_layers: int | None = None, with_mtp: bool = True) -> tuple[dict, set]:
    """megatron-core tensors for one pipeline stage, and the set of HF names consumed."""
    src = _Source(hf_state_dict)
    out: dict[str, torch.Tensor] = {}
    if pre_process:
        out["embedding.word_embeddings.weight"] = src.take("model.embed_tokens.weight")
    pattern = cfg.moe_layer_pattern
    count = cfg.num_hidden_layers if num_local_layers is None else num_local_layers
    for local in range(count):
        g = layer_offset + local
        layer = _layer(src, f"model.layers.{g}", cfg, bool(pattern[g]), rope_interleave)
        out.update({f"decoder.layers.{local}.{k}": v for k, v in layer.items()})
    if post_process:
        out["decoder.final_layernorm.weight"] = src.take("model.norm.weight")
        if not cfg.tie_word_embeddings:
            out["output_layer.weight"] = src.take("lm_head.weight")
        for k in range(cfg.num_nextn_predict_layers if with_mtp else 0):
            hf = f"model.layers.{cfg.num_hidden_layers + k}"
            mtp = {"enorm.weight": src.take(f"{hf}.enorm.weight"), "hnorm.weight": src.take(f"{hf}.hnorm.weight"),
                   "eh_proj.weight": src.take(f"{hf}.eh_proj.weight"),
                   "final_layernorm.weight": src.take(f"{hf}.shared_head.norm.weight")}
            mtp.update({f"mtp_model_layer.{n}": v
                        for n, v in _layer(src, hf, cfg, bool(pattern[-1]), rope_interleave).items()})
            out.update({f"mtp.layers.{k}.{n}": v for n, v in mtp.items()})
            # The MTP module shares the main embedding and head; the public checkpoint repeats them here.
            src.used.update(f"{hf}.{n}" for n in ("embed_tokens.weight", "shared_head.head.weight"))
    return out, src.used


def load_hf_state_dict(model: torch.nn.Module, hf_state_dict: Mapping[str, torch.Tensor], cfg: DSV3Config | None = None,
                       *, rope_interleave: bool = True) -> None:
    """Copy HF DeepSeek-V3 weights into a local-backend GPTModel built by `build_model` (TP=1, any EP, PP=1).

    Missing, unexpected or mis-shaped tensors raise one ValueError naming the tensor; nothing is copied then.
    """
    from megatron.core import parallel_state

    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        raise ValueError("load_hf_state_dict: tensor_model_parallel_size must be 1 (convert with dsv3-convert)")
    cfg = cfg or getattr(model, "dsv3_config", None)
    if cfg is None:
        raise ValueError("load_hf_state_dict: pass cfg= (the model was not built by megatron_dsv3.build_model)")
    has_mtp = getattr(model, "mtp", None) is not None
    target, used = hf_to_mcore(hf_state_dict, cfg, rope_interleave=rope_interleave,
                               pre_process=model.pre_process, post_process=model.post_process, with_mtp=has_mtp)
    if not has_mtp:  # a model built without MTP ignores the checkpoint's MTP layers
        used |= {n for n in hf_state_dict if _is_mtp_name(n, cfg)}
    unexpected = sorted(set(hf_state_dict) - used)
    if unexpected:
        raise ValueError(f"Hugging Face state dict: unexpected tensor {unexpected[0]!r}"
                         + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    bad = next((n for n, t in hf_state_dict.items() if not all_finite(t)),
               None)
    if bad is not None:
        raise ValueError(f"Hugging Face state dict: tensor {bad!r} holds NaN or Inf values")
    own = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    for name, tensor in own.items():
        if name not in target:
            raise ValueError(f"Hugging Face state dict: nothing maps to model tensor {name!r}")
        if tuple(target[name].shape) != tuple(tensor.shape):
            raise ValueError(f"Hugging Face state dict: tensor for {name!r} has shape {tuple(target[name].shape)}, "
                             f"expected {tuple(tensor.shape)}")
    with torch.no_grad():
        for name, tensor in own.items():
            tensor.copy_(target[name].to(tensor.dtype))


def _is_mtp_name(name: str, cfg: DSV3Config) -> bool:
    """Layers num_hidden_layers .. +D-1 hold the MTP modules (layer 61 in V3, ignored by transformers too)."""
    parts = name.split(".")
    if len(parts) < 3 or parts[1] != "layers" or not parts[2].isdigit():
        return False
    return 0 <= int(parts[2]) - cfg.num_hidden_layers < max(cfg.num_nextn_predict_layers, 1)
