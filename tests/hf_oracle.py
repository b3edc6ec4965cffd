"""Random tiny Hugging Face DeepSeek-V3 models: the independent oracle for parity tests."""
import torch
import transformers


def tiny_hf_config(**overrides) -> "transformers.DeepseekV3Config":
    fields = dict(
        vocab_size=96, hidden_size=48, intermediate_size=80, moe_intermediate_size=24, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=20, kv_lora_rank=16, qk_nope_head_dim=8,
        qk_rope_head_dim=8, v_head_dim=12, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=3,
        n_group=4, topk_group=2, first_k_dense_replace=1, max_position_embeddings=512, rms_norm_eps=1e-6,
        routed_scaling_factor=2.5, num_mtp_layers=0, attn_implementation="eager",
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 128, "beta_fast": 32, "beta_slow": 1,
                         "mscale": 1.0, "mscale_all_dim": 1.0},
    )
    fields.update(overrides)
    if fields.get("num_key_value_heads") != fields["num_attention_heads"]:
        fields["num_key_value_heads"] = fields["num_attention_heads"]
    return transformers.DeepseekV3Config(**fields)


def random_hf_model(hf_config, seed: int = 0) -> "transformers.DeepseekV3ForCausalLM":
    """Weights drawn large enough that routing and attention are far from uniform; random expert biases."""
    torch.manual_seed(seed)
    model = transformers.DeepseekV3ForCausalLM(hf_config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.1)
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.uniform_(-0.05, 0.05)
    return model
