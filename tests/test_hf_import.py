"""HF import: both expert layouts, MTP layer, EP slicing and errors that name the tensor."""
import pytest
import torch

import megatron_dsv3 as m
from megatron_dsv3.checkpoint.hf import config_from_hf, load_hf_state_dict
from tests.hf_oracle import random_hf_model, tiny_hf_config


def _per_expert_layout(state: dict) -> dict:
    """The public checkpoint's layout: one gate/up/down tensor per expert."""
    out = {}
    for name, t in state.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix, inter = name[: -len("gate_up_proj")], t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.gate_proj.weight"] = t[e, :inter]
                out[f"{prefix}{e}.up_proj.weight"] = t[e, inter:]
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name[: -len("down_proj")]
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.down_proj.weight"] = t[e]
        else:
            out[name] = t
    return out


def _mtp_tensors(model_state: dict, cfg) -> dict:
    """An MTP layer in the public checkpoint's naming, copied from decoder layer 1 plus its own norms."""
    L = cfg.num_hidden_layers
    out = {n.replace("model.layers.1.", f"model.layers.{L}."): t.clone() + 0.01
           for n, t in model_state.items() if n.startswith("model.layers.1.")}
    h = cfg.hidden_size
    out.update({f"model.layers.{L}.enorm.weight": torch.rand(h), f"model.layers.{L}.hnorm.weight": torch.rand(h),
                f"model.layers.{L}.eh_proj.weight": torch.randn(h, 2 * h) * 0.05,
                f"model.layers.{L}.shared_head.norm.weight": torch.rand(h),
                f"model.layers.{L}.shared_head.head.weight": model_state["lm_head.weight"],
                f"model.layers.{L}.embed_tokens.weight": model_state["model.embed_tokens.weight"]})
    return out


def test_per_expert_layout_gives_same_logits_as_fused(runtime):
    hf_config = tiny_hf_config()
    hf = random_hf_model(hf_config)
    cfg = config_from_hf(hf_config)
    fused, split = m.build_model(cfg).eval(), m.build_model(cfg).eval()
    load_hf_state_dict(fused, hf.state_dict())
    load_hf_state_dict(split, _per_expert_layout(hf.state_dict()))
    ids = torch.randint(0, hf_config.vocab_size, (1, 12))
    pos = torch.arange(12)[None]
    with torch.no_grad():
        assert torch.equal(fused(ids, pos, None), split(ids, pos, None))


def test_mtp_layer_is_loaded_into_the_mtp_block(runtime):
    hf_config = tiny_hf_config(num_mtp_layers=1)
    hf = random_hf_model(hf_config)
    cfg = config_from_hf(hf_config)
    assert cfg.num_nextn_predict_layers == 1
    state = _per_expert_layout(hf.state_dict())
    state.update(_mtp_tensors(state, cfg))
    model = m.build_model(cfg)
    load_hf_state_dict(model, state)
    mtp = model.mtp.layers[0]
    L = cfg.num_hidden_layers
    assert torch.equal(mtp.eh_proj.weight, state[f"model.layers.{L}.eh_proj.weight"])
    assert torch.equal(mtp.final_layernorm.weight, state[f"model.layers.{L}.shared_head.norm.weight"])
    assert torch.equal(mtp.mtp_model_layer.mlp.router.expert_bias,
                       state[f"model.layers.{L}.mlp.gate.e_score_correction_bias"])


@pytest.mark.parametrize("mutate,message", [
    (lambda s: s.pop("model.layers.0.self_attn.kv_b_proj.weight"), "missing tensor 'model.layers.0.self_attn.kv_b_proj.weight'"),
    (lambda s: s.__setitem__("model.layers.1.mlp.gate.weight", torch.zeros(3, 3)), "'decoder.layers.1.mlp.router.weight' has shape (3, 3)"),
    (lambda s: s.__setitem__("model.layers.9.extra.weight", torch.zeros(1)), "unexpected tensor 'model.layers.9.extra.weight'"),
    (lambda s: s.pop("model.layers.2.mlp.experts.5.up_proj.weight"), "missing tensor 'model.layers.2.mlp.experts.5.up_proj.weight'"),
])
def test_bad_checkpoints_name_the_tensor_and_change_nothing(runtime, mutate, message):
    hf_config = tiny_hf_config()
    model = m.build_model(config_from_hf(hf_config))
    state = _per_expert_layout(random_hf_model(hf_config).state_dict())
    mutate(state)
    before = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_hf_state_dict(model, state)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if k in before)


def test_config_from_hf_accepts_public_config_json_dict():
    public = {"vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
              "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1,
              "n_routed_experts": 256, "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536,
              "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc",
              "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8, "first_k_dense_replace": 3,
              "norm_topk_prob": True, "scoring_func": "sigmoid", "hidden_act": "silu",
              "max_position_embeddings": 163840, "rms_norm_eps": 1e-06, "rope_theta": 10000,
              "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                               "original_max_position_embeddings": 4096, "type": "yarn"},
              "num_nextn_predict_layers": 1, "tie_word_embeddings": False, "initializer_range": 0.02}
    cfg = config_from_hf(public)
    assert cfg.replace(initializer_range=0.006) == m.presets.get_preset("v3-671b")
