"""Megatron-LM's own argument parser plus the plugin's flags, mapped onto DSV3Config.

Flags keep Megatron-LM's names; `--preset` supplies a base shape and explicitly given flags override it.
"""
from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from typing import Callable, Optional, Sequence

from megatron_dsv3 import registry
from megatron_dsv3.config import DSV3Config, YarnConfig
from megatron_dsv3.pipeline.dual import SCHEDULES as PIPELINE_SCHEDULES
from megatron_dsv3.presets import PRESETS, get_preset

# Megatron-LM dest -> DSV3Config field, for flags whose value carries over unchanged.
_DIRECT = {
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
_YARN = {
    "rotary_scaling_factor": "factor",
    "mscale": "mscale",
    "mscale_all_dim": "mscale_all_dim",
    "beta_fast": "beta_fast",
    "beta_slow": "beta_slow",
    "original_max_position_embeddings": "original_max_position_embeddings",
}


_FLAG_OF_FIELD = {field: "--" + dest.replace("_", "-") for dest, field in _DIRECT.items()}
_FLAG_OF_FIELD.update({
    "rms_norm_eps": "--norm-epsilon", "n_shared_experts": "--moe-shared-expert-intermediate-size",
    "first_k_dense_replace": "--moe-layer-freq", "seq_aux_alpha": "--moe-aux-loss-coeff",
    "tie_word_embeddings": "--untie-embeddings-and-output-weights",
    **{f"rope_scaling.{f}": "--" + d.replace("_", "-") for d, f in _YARN.items()},
})


def _as_flag_error(err: Exception) -> "UsageError":
    """Rephrase `DSV3Config.<field>: ...` as `--<megatron-flag> (<field>): ...` for command-line users."""
    text = str(err)
    if text.startswith("DSV3Config."):
        field, _, rest = text[len("DSV3Config."):].partition(": ")
        text = f"{_FLAG_OF_FIELD.get(field, field)} ({field}): {rest}"
    return UsageError(text)


class UsageError(ValueError):
    """Bad command-line input: reported as one line and exit code 2."""


def add_dsv3_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The plugin's flags, added next to Megatron-LM's (the YaRN ones only where Megatron lacks them)."""
    group = parser.add_argument_group(title="megatron_dsv3")
    group.add_argument("--model-spec", default="dsv3",
                       help=f"registered layer spec to build (known: {', '.join(registry.names())})")
    group.add_argument("--preset", default=None, choices=None,
                       help=f"base DeepSeek-V3 shape ({', '.join(PRESETS)}); explicit flags override it")
    known = {o for a in parser._actions for o in a.option_strings}
    for flag, kind, text in (("--beta-fast", float, "YaRN beta_fast"), ("--beta-slow", float, "YaRN beta_slow"),
                             ("--original-max-position-embeddings", int, "YaRN original context length")):
        if flag not in known:
            group.add_argument(flag, type=kind, default=None, help=text)
    group.add_argument("--dsv3-backend", choices=["local", "te"], default=None,
                       help="module backend; default: te when Transformer Engine imports on a GPU, else local")
    group.add_argument("--fp8-no-scaling-control", action="store_true",
                       help="numerics negative control for --fp8-recipe blockwise: cast GEMM operands to E4M3 "
                            "with scale 1 (no block scaling); not for real training")
    group.add_argument("--pipeline-schedule", choices=PIPELINE_SCHEDULES, default="1f1b",
                       help="pipeline schedule: megatron-core's 1F1B, or DeepSeek-V3's DualPipe (two chunks per "
                            "rank: a stage and its mirror) or DualPipeV (2 x PP stages placed in a V)")
    group.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                       help="show a progress bar with loss and tokens/s")
    return parser


def chain_providers(*providers: Optional[Callable]) -> Callable:
    """One extra_args_provider that applies each given provider in turn (None entries skipped)."""

    def provider(parser):
        for p in providers:
            if p is not None:
                parser = p(parser) or parser
        return parser

    return provider


@contextmanager
def _argv(argv: Sequence[str]):
    saved = sys.argv
    sys.argv = [saved[0] if saved else "dsv3-pretrain", *argv]
    try:
        yield
    finally:
        sys.argv = saved


def parse_megatron_args(argv: Sequence[str], extra_args_provider: Optional[Callable] = None):
    """Parse with `megatron.training.arguments.parse_args`; returns (args, explicitly given dests)."""
    from megatron.training.arguments import parse_args

    captured = {}

    def provider(parser):
        parser = chain_providers(add_dsv3_args, extra_args_provider)(parser)
        captured["parser"] = parser
        return parser

    with _argv(argv):
        args = parse_args(provider)
    return args, explicit_dests(captured["parser"], argv)


def explicit_dests(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """The dests of options that appear on the command line (so presets never override them)."""
    by_flag = {o: a.dest for a in parser._actions for o in a.option_strings}
    return {by_flag[tok.split("=", 1)[0]] for tok in argv if tok.split("=", 1)[0] in by_flag}


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


def config_from_args(args: argparse.Namespace, explicit: set[str]) -> DSV3Config:
    """DSV3Config: the preset (or DeepSeek-V3 671B defaults) with every explicit flag applied."""
    if args.model_spec not in registry.names():
        raise UsageError(f"--model-spec: unknown spec {args.model_spec!r}; registered: {registry.names()}")
    try:
        base = get_preset(args.preset) if args.preset else DSV3Config()
    except ValueError as err:
        raise UsageError(str(err)) from None
    fields = {field: getattr(args, dest) for dest, field in _DIRECT.items() if dest in explicit}
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
        yarn = {f: getattr(args, d) for d, f in _YARN.items() if d in explicit and getattr(args, d) is not None}
        if yarn or args.rope_type == "yarn":
            fields["rope_scaling"] = YarnConfig(**{**vars_of(base.rope_scaling or YarnConfig()), **yarn})
    try:
        return base.replace(**fields)
    except (ValueError, TypeError) as err:
        raise _as_flag_error(err) from None


def vars_of(yarn: YarnConfig) -> dict:
    return {k: getattr(yarn, k) for k in YarnConfig.__dataclass_fields__}
