"""Named DeepSeek-V3 shapes (configuration only: `megatron_dsv3.model.parameters` counts their parameters)."""
from __future__ import annotations

from megatron_dsv3.config import DSV3Config, YarnConfig

PRESETS: dict[str, DSV3Config] = {
    # Trains on a laptop CPU in seconds: every DeepSeek-V3 feature on, at toy width.
    "tiny": DSV3Config(
        vocab_size=512, hidden_size=64, intermediate_size=160, moe_intermediate_size=32,
        num_hidden_layers=4, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_shared_experts=1, n_routed_experts=8,
        num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1, max_position_embeddings=1024,
        rope_scaling=YarnConfig(factor=4.0, original_max_position_embeddings=256), initializer_range=0.02,
    ),
    # A few minutes on CPU; still fine-grained (32 experts, 4 active).
    "small": DSV3Config(
        vocab_size=512, hidden_size=256, intermediate_size=704, moe_intermediate_size=96,
        num_hidden_layers=6, num_attention_heads=8, q_lora_rank=96, kv_lora_rank=64,
        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_shared_experts=1, n_routed_experts=32,
        num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=1, max_position_embeddings=4096,
        rope_scaling=YarnConfig(factor=4.0, original_max_position_embeddings=1024), initializer_range=0.02,
    ),
    # DeepSeek-V2-Lite's 16B shape: no q compression, softmax routing, 2 shared + 64 routed experts.
    "v2-lite": DSV3Config(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, num_attention_heads=16, q_lora_rank=None, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_shared_experts=2, n_routed_experts=64,
        num_experts_per_tok=6, n_group=1, topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=False,
        scoring_func="softmax", first_k_dense_replace=1, num_nextn_predict_layers=0,
        max_position_embeddings=163840,
        rope_scaling=YarnConfig(factor=40.0, original_max_position_embeddings=4096, mscale=0.707,
                                mscale_all_dim=0.707),
    ),
    # The released 671B model (config_671B.json).
    "v3-671b": DSV3Config(),
}


def get_preset(name: str) -> DSV3Config:
    """The preset called `name` (tiny, small, v2-lite, v3-671b)."""
    if not isinstance(name, str) or name not in PRESETS:
        raise ValueError(f"--preset: unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]
