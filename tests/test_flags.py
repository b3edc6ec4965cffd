"""Every Megatron-LM flag reaches the model or is refused: a table over both entry points.

Each honoured flag must be visible in the megatron-core config of the model that dsv3-pretrain and
Megatron-LM's model provider build; each refused one ends dsv3-pretrain with exit 2 and one line naming it.
"""
import sys

import pytest
import torch

import megatron_dsv3.megatron_lm as mlm
from megatron_dsv3.cli import UsageError
from megatron_dsv3.model.builder import build_model
from megatron_dsv3.moe.grouped_experts import GroupedMLP
from megatron_dsv3.training.pretrain import main, prepare

BASE = ["--preset", "tiny", "--seq-length", "16", "--micro-batch-size", "2", "--train-iters", "1"]


def _experts(model):
    return [m for m in model.modules() if type(m).__name__ in ("SequentialMLP", "GroupedMLP")]


HONOURED = [
    (["--fp8-format", "e4m3", "--fp8-recipe", "blockwise"],
     lambda c, m: c.fp8_recipe == "blockwise" and c.local_fp8.scaling == "blockwise" and c.fp8 is None),
    (["--recompute-granularity", "selective", "--recompute-modules", "layernorm", "mla_up_proj"],
     lambda c, m: c.recompute_granularity == "selective" and {"layernorm", "mla_up_proj"} <= set(c.recompute_modules)),
    (["--moe-grouped-gemm"], lambda c, m: c.moe_grouped_gemm and all(isinstance(e, GroupedMLP) for e in _experts(m))),
    (["--moe-grouped-gemm", "--recompute-granularity", "selective", "--recompute-modules", "moe_act"],
     lambda c, m: c.moe_grouped_gemm and "moe_act" in c.recompute_modules
     and all(e.activation_recompute for e in _experts(m))),
    (["--attention-dropout", "0.2", "--hidden-dropout", "0.1"],
     lambda c, m: (c.attention_dropout, c.hidden_dropout) == (0.2, 0.1)),
    (["--kv-channels", "16"], lambda c, m: c.kv_channels == 16),
    (["--moe-router-dtype", "fp64"], lambda c, m: c.moe_router_dtype == "fp64"),
    (["--moe-router-pre-softmax"], lambda c, m: c.moe_router_pre_softmax),
    (["--moe-router-force-load-balancing"], lambda c, m: c.moe_router_force_load_balancing),
    (["--moe-z-loss-coeff", "0.001"], lambda c, m: c.moe_z_loss_coeff == 0.001),
    (["--moe-expert-capacity-factor", "1.5"], lambda c, m: c.moe_expert_capacity_factor == 1.5),
    (["--moe-token-dispatcher-type", "allgather"], lambda c, m: c.moe_token_dispatcher_type == "allgather"),
    (["--moe-router-load-balancing-type", "aux_loss"], lambda c, m: c.moe_router_load_balancing_type == "aux_loss"),
    (["--calculate-per-token-loss"], lambda c, m: c.calculate_per_token_loss),
    (["--bf16"], lambda c, m: c.bf16 and c.params_dtype == c.pipeline_dtype == torch.bfloat16),
    (["--fp16"], lambda c, m: c.fp16 and c.params_dtype == c.pipeline_dtype == torch.float16),
    ([], lambda c, m: c.moe_router_load_balancing_type == "seq_aux_loss" and c.hidden_dropout == 0.0
     and c.moe_router_dtype == "fp32" and c.moe_token_dispatcher_type == "alltoall"),  # DeepSeek's recipe
]

REFUSED = [
    (["--kv-channels", "32"], "--kv-channels: MLA's value head size"),
    (["--normalization", "LayerNorm"], "--normalization: not supported by the dsv3 spec"),
    (["--position-embedding-type", "learned_absolute"], "--position-embedding-type: not supported"),
    (["--group-query-attention"], "--group-query-attention: not supported"),
    (["--moe-router-fusion"], "--moe-router-fusion: not supported"),
    (["--moe-router-load-balancing-type", "sinkhorn"], "--moe-router-load-balancing-type: sinkhorn"),
    (["--moe-token-dispatcher-type", "flex"], "--moe-token-dispatcher-type flex: needs DeepEP"),
    (["--use-precision-aware-optimizer", "--use-distributed-optimizer"], "--use-precision-aware-optimizer:"),
    (["--exp-avg-dtype", "bf16"], "--exp-avg-dtype: only the precision-aware optimizer"),
    (["--fp8-recipe", "tensorwise"], "--fp8-recipe: 'tensorwise' needs Transformer Engine"),
    (["--moe-grouped-gemm", "--fp8-recipe", "blockwise"], "--moe-grouped-gemm: the local block-scaled FP8"),
    (["--transformer-impl", "transformer_engine"], "--transformer-impl transformer_engine: needs Transformer"),
]


def _pretrain_model(argv):
    cfg, _, _, kwargs = prepare(BASE + argv)
    return build_model(cfg, **kwargs)


@pytest.fixture
def megatron_lm_model(monkeypatch, runtime):
    """Megatron-LM's parse_and_validate_args, then the dsv3 model provider (process-global state undone)."""
    from megatron.training import global_vars

    def provide(argv):
        monkeypatch.setattr(sys, "argv", ["pretrain_gpt.py", *BASE, *argv])
        monkeypatch.setattr(mlm, "_PARSER", {})
        global_vars.unset_global_variables()
        mlm.parse_args()
        return mlm.model_provider(pre_process=True, post_process=True)

    yield provide
    global_vars.unset_global_variables()


@pytest.mark.parametrize("argv,honoured", HONOURED, ids=[" ".join(a) or "defaults" for a, _ in HONOURED])
def test_flag_reaches_the_model_in_both_entry_points(runtime, megatron_lm_model, argv, honoured):
    for model in (_pretrain_model(argv), megatron_lm_model(argv)):
        assert honoured(model.config, model), (argv, model.config)


@pytest.mark.parametrize("argv,message", REFUSED, ids=[" ".join(a) for a, _ in REFUSED])
def test_flag_the_spec_cannot_honour_is_refused_in_one_line(capsys, monkeypatch, runtime, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(BASE + argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dsv3-pretrain: error: ") and message in err[0], err
    monkeypatch.setattr(sys, "argv", ["x", *BASE, *argv])
    monkeypatch.setattr(mlm, "_PARSER", {})
    from megatron.training import global_vars
    global_vars.unset_global_variables()
    try:
        with pytest.raises(UsageError, match=message.replace("(", r"\(")):
            mlm.parse_args()
    finally:
        global_vars.unset_global_variables()


def test_the_671b_recipe_flags_reach_megatron_core(monkeypatch):
    """The 671B launch script's flags, parsed and validated on 2048 ranks, ask for TE's block-scaled FP8,
    selective recompute of the report's modules and grouped GEMM, and megatron-core's config gets them."""
    from megatron_dsv3.cli.model_config import config_from_args, model_kwargs_from_args
    from megatron_dsv3.cli.parser import parse_megatron_args, validate_megatron_args
    from megatron_dsv3.model.transformer_config import to_mcore_config
    from tests.test_megatron_lm import EXAMPLES, _script_arguments

    monkeypatch.setenv("WORLD_SIZE", "2048")
    monkeypatch.setattr("megatron_dsv3.runtime.te_available", lambda: True)  # as on the H800 cluster,
    monkeypatch.setattr("megatron.core.transformer.transformer_config.is_te_min_version", lambda *a, **k: True)
    args, explicit = parse_megatron_args(_script_arguments(EXAMPLES / "train_v3_671b.sh"))
    validate_megatron_args(args)
    cfg = config_from_args(args, explicit)
    kwargs = model_kwargs_from_args(args, explicit, cfg)
    assert kwargs["backend"] == "te"
    config = to_mcore_config(cfg, **{k: v for k, v in kwargs.items() if k != "backend"})
    assert (config.fp8, config.fp8_recipe) == ("e4m3", "blockwise")
    assert config.recompute_granularity == "selective"
    assert {"layernorm", "mla_up_proj", "moe_act"} <= set(config.recompute_modules)
    assert config.moe_grouped_gemm and config.bf16 and config.pipeline_dtype == torch.bfloat16
    assert config.pipeline_model_parallel_size == 16 and config.expert_model_parallel_size == 64
