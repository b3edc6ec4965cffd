"""Megatron-LM flags -> the model: `DSV3Config` (DeepSeek's architecture) and megatron-core's transformer config.

One path for every entry point: megatron-core's config is built as Megatron-LM builds it
(`core_transformer_config_from_args`), so every flag megatron-core understands (precision, recompute,
dropout, dispatcher, FP8, ...) reaches the model, and DeepSeek's architecture fields from `DSV3Config` are laid
over it. Flags the dsv3 spec cannot honour are refused with one line naming the flag and why.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
from typing import Optional

from megatron_dsv3 import registry
from megatron_dsv3.cli.errors import UsageError
from megatron_dsv3.config import DSV3Config, YarnConfig
from megatron_dsv3.presets import get_preset

# Megatron-LM dest -> DSV3Config field, for flags whose value carries over unchanged.
DIRECT = {
    "num_layers": "num_hidden_layers",
    "hidden_size": "hidden_size",
    "ffn_hidden_size": "intermediate_size",
    "num_attention_heads": "num_attention_heads",
    "num_experts": "n_routed_experts",
    "moe_ffn_hidden_size": "moe_intermediate_size",
    "moe_router_topk": "num_experts_per_tok",
    "moe_router_num_groups": "n_group",
    "moe_router_group_topk": "topk_group",
    "moe_router_topk_scaling_factor": "routed_scaling_factor",
    "moe_router_score_function": "scoring_func",
    "moe_router_bias_update_rate": "bias_update_speed",
    "mtp_num_layers": "num_nextn_predict_layers",
    "mtp_loss_scaling_factor": "mtp_loss_weight",
    "q_lora_rank": "q_lora_rank",
    "kv_lora_rank": "kv_lora_rank",
    "qk_head_dim": "qk_nope_head_dim",
    "qk_pos_emb_head_dim": "qk_rope_head_dim",
    "v_head_dim": "v_head_dim",
    "rotary_base": "rope_theta",
    "layernorm_epsilon": "rms_norm_eps",
    "max_position_embeddings": "max_position_embeddings",
    "init_method_std": "initializer_range",
    "vocab_size": "vocab_size",
    "tensor_model_parallel_size": "tensor_model_parallel_size",
    "pipeline_model_parallel_size": "pipeline_model_parallel_size",
    "expert_model_parallel_size": "expert_model_parallel_size",
    "decoder_first_pipeline_num_layers": "first_pipeline_stage_layers",
    "decoder_last_pipeline_num_layers": "last_pipeline_stage_layers",
}
# Megatron-LM dest -> YarnConfig field.
YARN = {
    "rotary_scaling_factor": "factor",
    "mscale": "mscale",
    "mscale_all_dim": "mscale_all_dim",
    "beta_fast": "beta_fast",
    "beta_slow": "beta_slow",
    "original_max_position_embeddings": "original_max_position_embeddings",
}

FLAG_OF_FIELD = {field: "--" + dest.replace("_", "-") for dest, field in DIRECT.items()}
FLAG_OF_FIELD.update({
    "rms_norm_eps": "--norm-epsilon", "n_shared_experts": "--moe-shared-expert-intermediate-size",
    "first_k_dense_replace": "--moe-layer-freq", "seq_aux_alpha": "--moe-aux-loss-coeff",
    "tie_word_embeddings": "--untie-embeddings-and-output-weights",
    **{f"rope_scaling.{f}": "--" + d.replace("_", "-") for d, f in YARN.items()},
})


# dest -> the option string Megatron-LM's parser uses for it (filled in when the parser is built; most are the
# dest with dashes, some are not: layernorm_epsilon is --norm-epsilon, fp8 is --fp8-format).
FLAG_NAMES: dict[str, str] = {}


def flag(dest: str) -> str:
    return FLAG_NAMES.get(dest) or "--" + dest.replace("_", "-")


def megatron_defaults(cfg: DSV3Config, cuda: bool) -> dict:
    """Megatron-LM flag values (by dest) describing `cfg`, the architecture the dsv3 spec builds, and DeepSeek's
    recipe where Megatron-LM's defaults differ; the parser's defaults whenever the dsv3 spec is requested."""
    from megatron_dsv3 import runtime

    values = {dest: getattr(cfg, field) for dest, field in DIRECT.items()}
    values["mtp_num_layers"] = cfg.num_nextn_predict_layers or None
    if cfg.rope_scaling is not None:
        values.update({dest: getattr(cfg.rope_scaling, field) for dest, field in YARN.items()})
    k = cfg.first_k_dense_replace
    values.update(
        # The dsv3 spec's architecture.
        multi_latent_attention=True, normalization="RMSNorm", swiglu=True, position_embedding_type="rope",
        rope_type="yarn" if cfg.rope_scaling else "rope", qk_layernorm=True, add_bias_linear=False,
        kv_channels=cfg.v_head_dim, untie_embeddings_and_output_weights=not cfg.tie_word_embeddings,
        moe_layer_freq=[0] * k + [1] * (cfg.num_hidden_layers - k) if cfg.n_routed_experts else 1,
        moe_shared_expert_intermediate_size=(cfg.n_shared_experts * cfg.moe_intermediate_size) or None,
        moe_router_enable_expert_bias=cfg.scoring_func == "sigmoid",
        moe_router_pre_softmax=cfg.scoring_func == "softmax",  # DeepSeek's softmax gate spans all experts
        moe_aux_loss_coeff=[cfg.seq_aux_alpha],
        # DeepSeek-V3's recipe where Megatron-LM's defaults differ.
        hidden_dropout=0.0, attention_dropout=0.0, moe_router_dtype="fp32", moe_token_dispatcher_type="alltoall",
        moe_router_load_balancing_type=["seq_aux_loss"],
        transformer_impl="transformer_engine" if runtime.te_available() else "local",
    )
    if not cuda:  # gloo; fused kernels that need a GPU off (the FP32 weight-gradient fusion has a CPU stand-in)
        values.update(distributed_backend="gloo", use_cpu_initialization=True, apply_rope_fusion=False,
                      masked_softmax_fusion=False, bias_swiglu_fusion=False, bias_gelu_fusion=False,
                      bias_dropout_fusion=False)
    elif importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is None:
        values["gradient_accumulation_fusion"] = False  # megatron-core refuses it without Apex's kernel
    return values


def apply_dependent_defaults(args: argparse.Namespace, explicit: set[str]) -> None:
    """Defaults that depend on other flags, unless the command line sets them: sequence parallelism with tensor
    parallelism (what megatron-core's MoE layers expect); on CPU, FP32 weight-gradient accumulation inside the
    GEMM (gradient_accumulation_fusion, a CPU stand-in in compat) for 16-bit training, as on GPUs."""
    import torch

    if args.tensor_model_parallel_size > 1 and "sequence_parallel" not in explicit:
        args.sequence_parallel = True
    if not torch.cuda.is_available() and "gradient_accumulation_fusion" not in explicit:
        args.gradient_accumulation_fusion = bool(args.bf16 or args.fp16)


def _first_k_dense(pattern, num_layers: int) -> int:
    """`--moe-layer-freq` as DeepSeek's first-k-dense layout; other patterns are not DeepSeek-V3."""
    if isinstance(pattern, int):
        if pattern != 1:
            raise UsageError(f"--moe-layer-freq: DeepSeek-V3 needs ([0]*k+[1]*N) or 1, got {pattern}")
        return 0
    k = next((i for i, v in enumerate(pattern) if v == 1), len(pattern))
    if list(pattern) != [0] * k + [1] * (len(pattern) - k) or len(pattern) != num_layers:
        raise UsageError(f"--moe-layer-freq: expected [0]*k+[1]*(num_layers-k) with {num_layers} entries, "
                         f"got {list(pattern)}")
    return k


def _as_flag_error(err: Exception) -> UsageError:
    """Rephrase `DSV3Config.<field>: ...` as `--<megatron-flag> (<field>): ...` for command-line users."""
    text = str(err)
    if text.startswith("DSV3Config."):
        field, _, rest = text[len("DSV3Config."):].partition(": ")
        text = f"{FLAG_OF_FIELD.get(field, field)} ({field}): {rest}"
    return UsageError(text)


def _yarn_values(yarn: YarnConfig) -> dict:
    return {k: getattr(yarn, k) for k in YarnConfig.__dataclass_fields__}


def config_from_args(args: argparse.Namespace, explicit: set[str]) -> DSV3Config:
    """DSV3Config: the preset (or DeepSeek-V3 671B defaults) with every explicit flag applied."""
    if args.model_spec not in registry.names():
        raise UsageError(f"--model-spec: unknown spec {args.model_spec!r}; registered: {registry.names()}")
    try:
        base = get_preset(args.preset) if args.preset else DSV3Config()
    except ValueError as err:
        raise UsageError(str(err)) from None
    fields = {field: getattr(args, dest) for dest, field in DIRECT.items() if dest in explicit}
    if "num_layers" in explicit and "moe_layer_freq" not in explicit:
        fields["first_k_dense_replace"] = min(base.first_k_dense_replace, args.num_layers)
    if "moe_layer_freq" in explicit:
        fields["first_k_dense_replace"] = _first_k_dense(args.moe_layer_freq,
                                                         fields.get("num_hidden_layers", base.num_hidden_layers))
    if "moe_shared_expert_intermediate_size" in explicit:
        expert = fields.get("moe_intermediate_size", base.moe_intermediate_size)
        size = args.moe_shared_expert_intermediate_size or 0
        if size % expert:
            raise UsageError(f"--moe-shared-expert-intermediate-size: {size} is not a multiple of the expert "
                             f"size {expert}")
        fields["n_shared_experts"] = size // expert
    if "moe_aux_loss_coeff" in explicit:
        coeff = args.moe_aux_loss_coeff
        fields["seq_aux_alpha"] = float(coeff[0] if isinstance(coeff, (list, tuple)) else coeff)
    if "untie_embeddings_and_output_weights" in explicit:
        fields["tie_word_embeddings"] = not args.untie_embeddings_and_output_weights
    if "mtp_num_layers" in explicit and args.mtp_num_layers is None:
        fields["num_nextn_predict_layers"] = 0
    if getattr(args, "rope_type", None) == "rope":
        fields["rope_scaling"] = None
    else:
        yarn = {f: getattr(args, d) for d, f in YARN.items() if d in explicit and getattr(args, d) is not None}
        if yarn or args.rope_type == "yarn":
            fields["rope_scaling"] = YarnConfig(**{**_yarn_values(base.rope_scaling or YarnConfig()), **yarn})
    try:
        return base.replace(**fields)
    except (ValueError, TypeError) as err:
        raise _as_flag_error(err) from None


# Flags naming an architecture other than the one the dsv3 spec builds: (dest, value the spec needs, why).
_SPEC_ARCHITECTURE = (
    ("normalization", "RMSNorm", "DeepSeek-V3 normalises with RMSNorm"),
    ("position_embedding_type", "rope", "MLA applies its decoupled RoPE (YaRN through --rope-type yarn)"),
    ("group_query_attention", False, "the dsv3 spec uses multi-head latent attention, not GQA"),
    ("squared_relu", False, "DeepSeek-V3's MLPs are SwiGLU"),
    ("quick_geglu", False, "DeepSeek-V3's MLPs are SwiGLU"),
    ("moe_router_fusion", False, "the DeepSeek router computes its group-limited top-k in PyTorch (no fused "
                                 "kernel)"),
    ("moe_enable_routing_replay", False, "the DeepSeek router does not record or replay routing"),
    ("heterogeneous_layers_config_path", None, "the dsv3 spec builds DeepSeek-V3's layers"),
    ("hybrid_layer_pattern", None, "the dsv3 spec builds a GPTModel; --hybrid-layer-pattern selects HybridModel"),
)


def check_supported(args: argparse.Namespace, explicit: set[str], cfg: DSV3Config, backend: str,
                    local_fp8: bool = False) -> None:
    """Refuse, with one line, flags the dsv3 spec cannot honour."""
    for dest, needed, why in _SPEC_ARCHITECTURE:
        if dest in explicit and getattr(args, dest, needed) != needed:
            raise UsageError(f"{flag(dest)}: not supported by the dsv3 spec ({why})")
    if "kv_channels" in explicit and args.kv_channels != cfg.v_head_dim:
        raise UsageError(f"--kv-channels: MLA's value head size is --v-head-dim ({cfg.v_head_dim}), "
                         f"got {args.kv_channels}")
    balancing = args.moe_router_load_balancing_type
    for kind in balancing if isinstance(balancing, (list, tuple)) else [balancing]:
        if kind in ("sinkhorn", "quantile_balancing"):
            raise UsageError(f"--moe-router-load-balancing-type: {kind} replaces DeepSeek's routing; the dsv3 "
                             "router balances with aux_loss, seq_aux_loss, global_aux_loss or none")
    if args.moe_token_dispatcher_type == "flex":
        if not any(importlib.util.find_spec(m) for m in ("deep_ep", "hybrid_ep")):
            raise UsageError("--moe-token-dispatcher-type flex: needs DeepEP or HybridEP (CUDA); use alltoall")
    low_precision_moments = [d for d in ("exp_avg_dtype", "exp_avg_sq_dtype")
                             if d in explicit and str(getattr(args, d)) not in ("fp32", "torch.float32")]
    if low_precision_moments and not getattr(args, "use_precision_aware_optimizer", False):
        raise UsageError(f"{flag(low_precision_moments[0])}: only the precision-aware optimizer keeps AdamW moments "
                         "in another dtype; add --use-precision-aware-optimizer")
    if getattr(args, "use_precision_aware_optimizer", False) and backend != "te":
        raise UsageError("--use-precision-aware-optimizer: megatron-core runs it in Transformer Engine's "
                         "FusedAdam (CUDA); not available here")
    if getattr(args, "moe_grouped_gemm", False) and backend == "local":
        if local_fp8:
            raise UsageError("--moe-grouped-gemm: the local block-scaled FP8 experts run one GEMM per expert; "
                             "drop one of --moe-grouped-gemm and --fp8-recipe blockwise")
        expert_tp = args.expert_tensor_parallel_size or args.tensor_model_parallel_size
        if expert_tp != 1:
            raise UsageError(f"--moe-grouped-gemm: the local grouped experts need expert tensor parallel size 1 "
                             f"(--expert-tensor-parallel-size), got {expert_tp}")


def mcore_overrides(args: argparse.Namespace, cfg: DSV3Config, backend: str) -> dict:
    """megatron-core TransformerConfig fields from the flags, built as Megatron-LM does, without the fields
    `DSV3Config` owns (its architecture); `to_mcore_config` lays DeepSeek's values over these."""
    from megatron.training.argument_utils import core_transformer_config_from_args

    from megatron_dsv3.model.transformer_config import architecture_fields

    if backend == "local":  # megatron-core's `fp8` switches Transformer Engine's autocast on; the local
        args = argparse.Namespace(**{**vars(args), "fp8": None, "fp8_param_gather": False})  # FP8 linears
    try:                                                            # take the FP8Config instead
        base = core_transformer_config_from_args(args)
    except (AssertionError, ValueError, TypeError) as err:
        raise UsageError(f"megatron-core rejects the flags: {err}") from None
    owned = set(architecture_fields(cfg))
    values = {f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.init and f.name not in owned}
    values["transformer_impl"] = "transformer_engine" if backend == "te" else "local"
    kind = values.get("moe_router_load_balancing_type")
    if isinstance(kind, (list, tuple)) and len(kind) == 1:  # one type, one (scalar) coefficient
        values["moe_router_load_balancing_type"] = kind[0]
    return values


def resolve_backend(args: argparse.Namespace, explicit: set[str]) -> Optional[str]:
    """`--dsv3-backend`, else an explicit `--transformer-impl`, else None (TE when usable on a GPU)."""
    if getattr(args, "dsv3_backend", None):
        return args.dsv3_backend
    if "transformer_impl" in explicit:
        impl = args.transformer_impl
        if impl not in ("local", "transformer_engine"):
            raise UsageError(f"--transformer-impl: the dsv3 spec has local and transformer_engine backends, "
                             f"got {impl!r}")
        return "te" if impl == "transformer_engine" else "local"
    return None


def check_flags(args: argparse.Namespace, explicit: set[str], cfg: DSV3Config) -> dict:
    """Everything about the flags that can be refused before Megatron-LM validates them; returns the backend
    and FP8 `build_model` arguments."""
    from megatron_dsv3.fp8.recipe import fp8_model_kwargs
    from megatron_dsv3 import runtime

    requested = resolve_backend(args, explicit)
    if requested == "te" and not runtime.te_available():
        origin = "--dsv3-backend te" if getattr(args, "dsv3_backend", None) else "--transformer-impl transformer_engine"
        raise UsageError(f"{origin}: needs Transformer Engine and a CUDA GPU; use --transformer-impl local")
    try:
        kwargs = fp8_model_kwargs(args, explicit, requested)
    except ValueError as err:
        raise UsageError(str(err)) from None
    kwargs["backend"] = kwargs["backend"] or ("te" if runtime.te_available() else "local")
    decay = args.lr_decay_iters or args.train_iters  # Megatron-LM asserts this deep in its scheduler
    if args.lr_warmup_iters and decay and args.lr_warmup_iters >= decay:
        raise UsageError(f"--lr-warmup-iters: {args.lr_warmup_iters} warm-up steps must be fewer than the "
                         f"{decay} decay steps (--train-iters or --lr-decay-iters)")
    check_supported(args, explicit, cfg, kwargs["backend"],
                    local_fp8=kwargs.get("fp8_recipe") is not None and kwargs["backend"] == "local")
    return kwargs


def model_kwargs_from_args(args: argparse.Namespace, explicit: set[str], cfg: DSV3Config) -> dict:
    """`build_model` keyword arguments for validated flags: backend, FP8 and every megatron-core field they set."""
    kwargs = check_flags(args, explicit, cfg)
    return {**mcore_overrides(args, cfg, kwargs["backend"]), **kwargs}
