"""DSV3Config -> megatron-core MLATransformerConfig, with the fields megatron-core lacks."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import MLATransformerConfig

from megatron_dsv3.config import DSV3Config, yarn_get_mscale


@dataclass
class DSV3TransformerConfig(MLATransformerConfig):
    """MLATransformerConfig plus DeepSeek's top-k gate normalisation switch, fixed latent-norm eps and the
    local backend's FP8 recipe."""

    moe_router_norm_topk_prob: bool = True
    moe_router_group_score: str = "top2_sum"  # or "max" (DeepSeek-V2's group_limited_greedy)
    mla_latent_norm_eps: float = 1e-6
    local_fp8: Optional[Any] = None  # the local backend's block-scaled FP8 linears (megatron_dsv3.fp8.FP8Config)


def _yarn_fields(cfg: DSV3Config) -> dict:
    """megatron-core YaRN fields reproducing Hugging Face's cos/sin factor and DeepSeek's softmax mscale.

    megatron-core multiplies cos/sin by mscale(s, mscale) / mscale(s, mscale_all_dim); when DeepSeek's
    (mscale, mscale_all_dim) pair is not both set, HF uses other rules, so we solve for the mscale that
    gives HF's factor while mscale_all_dim keeps the softmax scale right.
    """
    y = cfg.rope_scaling
    if y is None:
        return dict(rope_type="rope", rotary_scaling_factor=1.0, mscale=1.0, mscale_all_dim=0.0)
    all_dim = y.mscale_all_dim or 0.0
    if y.attention_factor is None and y.mscale and y.mscale_all_dim:
        mscale = y.mscale
    elif y.factor > 1:
        mscale = (y.rope_attention_factor() * yarn_get_mscale(y.factor, all_dim) - 1.0) / (0.1 * math.log(y.factor))
    else:
        mscale = 1.0
    return dict(
        rope_type="yarn", rotary_scaling_factor=y.factor,
        original_max_position_embeddings=y.original_max_position_embeddings,
        beta_fast=y.beta_fast, beta_slow=y.beta_slow, mscale=mscale, mscale_all_dim=all_dim,
    )


def architecture_fields(cfg: DSV3Config) -> dict:
    """The megatron-core fields `cfg` determines: DeepSeek's architecture, routing and parallel layout. The
    command line cannot set these around `DSV3Config` (its flags build the DSV3Config instead)."""
    has_moe = cfg.n_routed_experts > 0 and cfg.first_k_dense_replace < cfg.num_hidden_layers
    moe = {}
    if has_moe:
        moe = dict(
            num_moe_experts=cfg.n_routed_experts,
            moe_layer_freq=cfg.moe_layer_pattern,
            moe_ffn_hidden_size=cfg.moe_intermediate_size,
            moe_shared_expert_intermediate_size=cfg.n_shared_experts * cfg.moe_intermediate_size or None,
            moe_router_topk=cfg.num_experts_per_tok,
            moe_router_num_groups=cfg.n_group if cfg.n_group > 1 else None,
            moe_router_group_topk=cfg.topk_group if cfg.n_group > 1 else None,
            moe_router_score_function=cfg.scoring_func,
            moe_router_topk_scaling_factor=cfg.routed_scaling_factor,
            moe_router_norm_topk_prob=cfg.norm_topk_prob,
            moe_router_group_score="max" if cfg.topk_method == "group_limited_greedy" else "top2_sum",
            moe_router_bias_update_rate=cfg.bias_update_speed,
            moe_aux_loss_coeff=cfg.seq_aux_alpha,
        )
    return dict(
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.intermediate_size,
        num_attention_heads=cfg.num_attention_heads,
        kv_channels=cfg.v_head_dim,
        q_lora_rank=cfg.q_lora_rank,
        kv_lora_rank=cfg.kv_lora_rank,
        qk_head_dim=cfg.qk_nope_head_dim,
        qk_pos_emb_head_dim=cfg.qk_rope_head_dim,
        v_head_dim=cfg.v_head_dim,
        multi_latent_attention=True,
        qk_layernorm=True,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        rotary_base=cfg.rope_theta,
        init_method_std=cfg.initializer_range,
        mtp_num_layers=cfg.num_nextn_predict_layers or None,
        mtp_loss_scaling_factor=cfg.mtp_loss_weight,
        tensor_model_parallel_size=cfg.tensor_model_parallel_size,
        pipeline_model_parallel_size=cfg.pipeline_model_parallel_size,
        num_layers_in_first_pipeline_stage=cfg.first_pipeline_stage_layers,
        num_layers_in_last_pipeline_stage=cfg.last_pipeline_stage_layers,
        expert_model_parallel_size=cfg.expert_model_parallel_size,
        **_yarn_fields(cfg),
        **moe,
    )


def recipe_defaults(cfg: DSV3Config) -> dict:
    """DeepSeek-V3's training-system choices where megatron-core's defaults differ; any may be overridden."""
    has_moe = cfg.n_routed_experts > 0 and cfg.first_k_dense_replace < cfg.num_hidden_layers
    moe = dict(
        moe_router_enable_expert_bias=cfg.scoring_func == "sigmoid",
        moe_router_pre_softmax=cfg.scoring_func == "softmax",  # DeepSeek's softmax gate spans all experts
        moe_router_load_balancing_type="seq_aux_loss",
        moe_router_dtype="fp32",
        moe_token_dispatcher_type="alltoall",
    ) if has_moe else {}
    return dict(
        hidden_dropout=0.0,
        attention_dropout=0.0,
        sequence_parallel=cfg.tensor_model_parallel_size > 1,
        use_cpu_initialization=not torch.cuda.is_available(),
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        **moe,
    )


def to_mcore_config(cfg: DSV3Config, **overrides) -> DSV3TransformerConfig:
    """megatron-core's config: DeepSeek's recipe defaults and `cfg`'s architecture, then `overrides` (any
    TransformerConfig field: bf16, fp8, recompute, ...; the command line passes everything it set except the
    architecture). `pipeline_dtype` follows `params_dtype` unless given, as in Megatron-LM."""
    if "params_dtype" in overrides:
        overrides.setdefault("pipeline_dtype", overrides["params_dtype"])
    return DSV3TransformerConfig(**{**recipe_defaults(cfg), **architecture_fields(cfg), **overrides})
