"""Config validation, presets and parameter counts."""
import pytest

from megatron_dsv3.config import DSV3Config, YarnConfig
from megatron_dsv3.model.parameters import count_parameters
from megatron_dsv3.presets import get_preset

TINY = get_preset("tiny")

BAD = [
    ("num_attention_heads", dict(tensor_model_parallel_size=3)),
    ("n_routed_experts", dict(expert_model_parallel_size=3)),
    ("n_group", dict(n_group=3)),
    ("topk_group", dict(topk_group=5)),
    ("num_experts_per_tok", dict(num_experts_per_tok=5)),
    ("qk_rope_head_dim", dict(qk_rope_head_dim=7)),
    ("rope_scaling.factor", dict(rope_scaling=YarnConfig(factor=0.0))),
    ("rope_scaling.beta_fast", dict(rope_scaling=YarnConfig(beta_fast=-1.0))),
    ("rope_scaling.mscale", dict(rope_scaling=YarnConfig(mscale=-0.1))),
    ("hidden_size", dict(hidden_size=0)),
    ("q_lora_rank", dict(q_lora_rank=-4)),
    ("first_k_dense_replace", dict(first_k_dense_replace=5)),
    ("scoring_func", dict(scoring_func="relu")),
    ("num_hidden_layers", dict(pipeline_model_parallel_size=3)),
    ("rms_norm_eps", dict(rms_norm_eps=0.0)),
    ("bias_update_speed", dict(bias_update_speed=-1e-3)),
    ("moe_intermediate_size", dict(moe_intermediate_size=0)),
    ("first_pipeline_stage_layers", dict(first_pipeline_stage_layers=1)),
    ("num_hidden_layers", dict(pipeline_model_parallel_size=3, first_pipeline_stage_layers=1)),
    ("vocab_size", dict(vocab_size=2.5)),
]


@pytest.mark.parametrize("field,change", BAD, ids=[b[0] + "-" + next(iter(b[1])) for b in BAD])
def test_bad_config_raises_one_value_error_naming_the_field(field, change):
    with pytest.raises(ValueError) as err:
        TINY.replace(**change)
    assert f"DSV3Config.{field}:" in str(err.value)


def test_valid_edge_configs_are_accepted():
    TINY.replace(rope_scaling=None, q_lora_rank=None, first_k_dense_replace=3)
    TINY.replace(n_group=1, topk_group=1, num_experts_per_tok=8)
    TINY.replace(tensor_model_parallel_size=4, expert_model_parallel_size=8)
    TINY.replace(pipeline_model_parallel_size=3, first_pipeline_stage_layers=2)
    get_preset("v3-671b").replace(pipeline_model_parallel_size=16, first_pipeline_stage_layers=4,
                                  last_pipeline_stage_layers=1)


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="--preset: unknown preset 'huge'.*tiny"):
        get_preset("huge")


def _analytic_counts(c: DSV3Config) -> dict:
    """Hand-derived DeepSeek-V3 parameter formula (independent of the built model)."""
    h, nh = c.hidden_size, c.num_attention_heads
    q = h * nh * c.qk_head_dim if c.q_lora_rank is None else h * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * nh * c.qk_head_dim
    attn = q + h * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank + c.kv_lora_rank * nh * (c.qk_nope_head_dim + c.v_head_dim) + nh * c.v_head_dim * h
    norms = 2 * h
    dense = 3 * h * c.intermediate_size
    expert = 3 * h * c.moe_intermediate_size
    moe_all = c.n_routed_experts * expert + c.n_shared_experts * expert + c.n_routed_experts * h
    moe_active = c.num_experts_per_tok * expert + c.n_shared_experts * expert + c.n_routed_experts * h
    k, n_moe = c.first_k_dense_replace, c.num_hidden_layers - c.first_k_dense_replace
    outer = 2 * c.vocab_size * h + h
    total = outer + c.num_hidden_layers * (attn + norms) + k * dense + n_moe * moe_all
    active = outer + c.num_hidden_layers * (attn + norms) + k * dense + n_moe * moe_active
    mtp_layer = 3 * h + 2 * h * h + attn + norms
    return {"total": total, "active": active,
            "mtp": c.num_nextn_predict_layers * (mtp_layer + moe_all),
            "mtp_active": c.num_nextn_predict_layers * (mtp_layer + moe_active)}


@pytest.mark.parametrize("name", ["tiny", "small", "v2-lite"])
def test_count_parameters_matches_formula(runtime, name):
    assert count_parameters(get_preset(name)) == _analytic_counts(get_preset(name))


def test_v3_671b_is_671b_total_37b_active(runtime):
    counts = count_parameters(get_preset("v3-671b"))
    assert counts == _analytic_counts(get_preset("v3-671b"))
    assert abs(counts["total"] / 671e9 - 1) < 0.005
    assert 37e9 <= counts["active"] < 38e9  # report: "37B activated" (embedding and head included)
    assert abs(counts["mtp"] / 11.5e9 - 1) < 0.02  # model card: 11.5B unique MTP parameters
