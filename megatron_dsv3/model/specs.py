"""DeepSeek-V3 layer specs for megatron-core: MLA attention, dense or DeepSeekMoE MLP, and the MTP block."""
from __future__ import annotations

from functools import partial
from typing import Optional

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.moe.moe_layer import MoESubmodules
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP
from megatron.core.transformer.multi_latent_attention import MLASelfAttentionSubmodules
from megatron.core.transformer.multi_token_prediction import (
    MultiTokenPredictionBlockSubmodules,
    MultiTokenPredictionLayer,
    MultiTokenPredictionLayerSubmodules,
    get_mtp_num_layers_to_build,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)

from megatron_dsv3 import registry
from megatron_dsv3.attention.mla import DSV3MLASelfAttention
from megatron_dsv3.model.backends import Backend
from megatron_dsv3.moe.dispatcher import DSV3MoELayer
from megatron_dsv3.moe.router import DeepSeekRouter


def mla_spec(config, backend: Backend) -> ModuleSpec:
    """Multi-head latent attention: low-rank q and joint kv compression with RMSNorm on both latents."""
    col = backend.provider.column_parallel_linear()
    has_q_lora = config.q_lora_rank is not None
    return ModuleSpec(
        module=DSV3MLASelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=MLASelfAttentionSubmodules(
            linear_q_proj=col,
            linear_q_down_proj=backend.down_proj_linear,
            linear_q_up_proj=col,
            linear_kv_down_proj=backend.down_proj_linear,
            linear_kv_up_proj=col,
            core_attention=backend.core_attention,
            linear_proj=backend.provider.row_parallel_linear(),
            q_layernorm=backend.latent_norm if has_q_lora else IdentityOp,
            kv_layernorm=backend.latent_norm,
        ),
    )


def _mlp_submodules(backend: Backend) -> MLPSubmodules:
    return MLPSubmodules(
        linear_fc1=backend.provider.column_parallel_linear(),
        linear_fc2=backend.provider.row_parallel_linear(),
    )


def dense_mlp_builder(backend: Backend):
    """SwiGLU feed-forward of the first-k dense layers."""
    return partial(MLP.as_mlp_submodule, submodules=_mlp_submodules(backend))


def moe_builder(config, backend: Backend):
    """DeepSeekMoE: shared experts plus fine-grained routed experts behind the DeepSeek router."""
    shared = partial(SharedExpertMLP, submodules=_mlp_submodules(backend))
    return partial(
        DSV3MoELayer,
        submodules=MoESubmodules(
            experts=backend.provider.grouped_mlp_modules(config.moe_grouped_gemm),
            shared_experts=shared if config.moe_shared_expert_intermediate_size else None,
            router=DeepSeekRouter,
        ),
    )


def layer_spec(config, backend: Backend, moe: bool) -> ModuleSpec:
    """One pre-norm decoder layer: RMSNorm -> MLA -> residual, RMSNorm -> MLP or MoE -> residual."""
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=backend.norm,
            self_attention=mla_spec(config, backend),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=backend.norm,
            mlp=moe_builder(config, backend) if moe else dense_mlp_builder(backend),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def _moe_pattern(config) -> list[int]:
    freq = config.moe_layer_freq
    if config.num_moe_experts is None:
        return [0] * config.num_layers
    if isinstance(freq, int):
        return [1 if i % freq == 0 else 0 for i in range(config.num_layers)]
    return list(freq)


def decoder_block_spec(config, backend: Backend, vp_stage: Optional[int] = None,
                       pp_rank: Optional[int] = None) -> TransformerBlockSubmodules:
    """The layers this pipeline stage builds: first-k dense layers, MoE after."""
    specs = [layer_spec(config, backend, moe=bool(m)) for m in _moe_pattern(config)]
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=specs[offset:offset + count], layer_norm=backend.norm)


def mtp_block_spec(config, backend: Backend, vp_stage: Optional[int] = None,
                   pp_rank: Optional[int] = None) -> Optional[MultiTokenPredictionBlockSubmodules]:
    """MTP modules: [RMSNorm(emb); RMSNorm(hidden)] -> eh_proj -> one MoE decoder layer (shared head outside)."""
    if not config.mtp_num_layers or get_mtp_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank) == 0:
        return None
    inner = layer_spec(config, backend, moe=_moe_pattern(config)[-1] == 1)
    mtp_layer = ModuleSpec(
        module=MultiTokenPredictionLayer,
        submodules=MultiTokenPredictionLayerSubmodules(
            enorm=backend.norm,
            hnorm=backend.norm,
            eh_proj=backend.provider.column_parallel_linear(),
            mtp_model_layer=inner,
            layer_norm=backend.norm,
        ),
    )
    return MultiTokenPredictionBlockSubmodules(layer_specs=[mtp_layer] * config.mtp_num_layers)


registry.register(registry.ModelSpec("dsv3", decoder_block_spec, mtp_block_spec), replace=True)
