"""Parameter counts of a DeepSeek-V3 shape, from the model built on the meta device (no memory allocated)."""
from __future__ import annotations

import torch
from megatron.core import parallel_state

from megatron_dsv3.config import DSV3Config
from megatron_dsv3.model.builder import build_model


def count_parameters(config: DSV3Config) -> dict[str, int]:
    """Parameters of the model built on the meta device.

    `total` and `active` (used per token: all but the unselected routed experts; embedding and head
    included) exclude the MTP module; `mtp` and `mtp_active` are the MTP module's own parameters, which
    reuse the main embedding and output head.
    """
    if not parallel_state.model_parallel_is_initialized():
        from megatron_dsv3 import runtime

        runtime.initialize()
    single = config.replace(tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                            expert_model_parallel_size=1)
    with torch.device("meta"):
        model = build_model(single, backend="local", pre_process=True, post_process=True,
                            perform_initialization=False)
    unselected = 1 - config.num_experts_per_tok / max(config.n_routed_experts, 1)
    counts = {"total": 0, "active": 0, "mtp": 0, "mtp_active": 0}
    for name, p in model.named_parameters():
        main = not name.startswith("mtp.")
        idle = round(p.numel() * unselected) if ".mlp.experts." in name else 0
        counts["total" if main else "mtp"] += p.numel()
        counts["active" if main else "mtp_active"] += p.numel() - idle
    return counts
