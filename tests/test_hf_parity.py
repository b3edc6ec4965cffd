"""The dsv3 spec against transformers' DeepseekV3ForCausalLM (fp32, CPU): logits and expert choices."""
import pytest
import torch

import megatron_dsv3 as m
from megatron_dsv3.checkpoint.hf import config_from_hf, load_hf_state_dict
from tests.hf_oracle import random_hf_model, tiny_hf_config

NO_YARN = {"rope_type": "default", "rope_theta": 10000.0}

CASES = {
    "q_lora+yarn+group2": {},
    "no_q_lora": dict(q_lora_rank=None),
    "topk_per_group_not_2": dict(n_routed_experts=12, n_group=3, topk_group=2, num_experts_per_tok=6),
    "topk_group_1": dict(n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=3),
    "no_yarn": dict(rope_parameters=NO_YARN),
    "first_k_dense_0": dict(first_k_dense_replace=0),
    "no_group_limit": dict(n_group=1, topk_group=1, num_experts_per_tok=2, norm_topk_prob=False),
    "yarn_mscale_0707": dict(rope_parameters={"rope_type": "yarn", "rope_theta": 5000.0, "factor": 8.0,
                                              "original_max_position_embeddings": 64, "beta_fast": 16,
                                              "beta_slow": 2, "mscale": 0.707, "mscale_all_dim": 0.707}),
    "yarn_mscale_only_all_dim": dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                                                      "original_max_position_embeddings": 32,
                                                      "mscale_all_dim": 1.0}),
    "rope_not_interleaved": dict(rope_interleave=False),
    "two_shared_experts": dict(n_shared_experts=2, rms_norm_eps=1e-5),
}


def _routing_hooks(hf, model):
    hf_choice, our_choice = {}, {}
    for i, layer in enumerate(hf.model.layers):
        if hasattr(layer.mlp, "gate"):
            layer.mlp.gate.register_forward_hook(
                lambda mod, inp, out, i=i: hf_choice.__setitem__(i, out[2].sort(dim=-1).values))
    for i, layer in enumerate(model.decoder.layers):
        router = getattr(layer.mlp, "router", None)
        if router is not None:
            def capture(mod, inp, out, i=i):
                # megatron-core routes [s, b] tokens; HF routes [b, s]: reorder to compare token by token.
                routing_map = out[1].view(inp[0].shape[0], inp[0].shape[1], -1).transpose(0, 1).reshape(-1, out[1].shape[-1])
                our_choice[i] = routing_map.nonzero()[:, 1].view(routing_map.shape[0], -1)
            router.register_forward_hook(capture)
    return hf_choice, our_choice


@pytest.mark.parametrize("seq_len", [1, 7, 33])
@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_and_expert_choice_match_transformers(runtime, case, seq_len):
    hf_config = tiny_hf_config(**CASES[case])
    hf = random_hf_model(hf_config, seed=len(case) + seq_len)
    cfg = config_from_hf(hf_config)
    model = m.build_model(cfg, backend="local").eval()
    load_hf_state_dict(model, hf.state_dict(), rope_interleave=hf_config.rope_interleave)
    hf_choice, our_choice = _routing_hooks(hf, model)

    ids = torch.randint(0, hf_config.vocab_size, (2, seq_len))
    positions = torch.arange(seq_len).expand(2, seq_len)
    with torch.no_grad():
        expected = hf(ids).logits
        actual = model(ids, positions, None)

    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() <= 1e-5
    assert sorted(hf_choice) == sorted(our_choice) and hf_choice
    for layer in hf_choice:
        assert torch.equal(hf_choice[layer], our_choice[layer]), f"expert choice differs in layer {layer}"


def test_parity_is_sensitive_to_a_wrong_weight(runtime):
    """The oracle comparison can fail: one perturbed expert bias changes logits or routing."""
    hf_config = tiny_hf_config()
    hf = random_hf_model(hf_config)
    model = m.build_model(config_from_hf(hf_config), backend="local").eval()
    state = dict(hf.state_dict())
    state["model.layers.1.mlp.gate.e_score_correction_bias"] = state["model.layers.1.mlp.gate.e_score_correction_bias"] + 1.0 * torch.arange(8)
    load_hf_state_dict(model, state)
    ids = torch.randint(0, hf_config.vocab_size, (2, 16))
    with torch.no_grad():
        diff = (model(ids, torch.arange(16).expand(2, 16), None) - hf(ids).logits).abs().max().item()
    assert diff > 1e-3
