"""torchrun worker: one tiny-preset training step with EP; writes this rank's expert biases and losses."""
import json
import os
import sys

import torch

import megatron_dsv3 as m
import megatron_dsv3.moe.balancing  # noqa: F401
from megatron_dsv3.moe.balancing import update_expert_bias


def main(out_dir: str, ep: int) -> None:
    m.runtime.initialize(ep=ep, seed=1234)
    rank = torch.distributed.get_rank()
    cfg = m.presets.get_preset("tiny").replace(expert_model_parallel_size=ep)
    model = m.build_model(cfg, backend="local")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch.manual_seed(100 + rank)  # each data-parallel rank sees its own tokens
    ids = torch.randint(0, cfg.vocab_size, (2, 32))
    loss = model(ids, torch.arange(32).expand(2, 32), None, labels=ids).mean()
    loss.backward()
    optimizer.step()
    routers = m.moe.balancing.biased_routers([model])
    before = [r.expert_bias.clone() for r in routers]
    local_loads = [r.local_tokens_per_expert.clone().tolist() for r in routers]
    loads = update_expert_bias([model])
    after = [r.expert_bias.clone() for r in m.moe.balancing.biased_routers([model])]
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"loss": loss.item(), "before": [b.tolist() for b in before],
                   "after": [a.tolist() for a in after], "loads": loads.tolist(),
                   "local_loads": local_loads, "gamma": cfg.bias_update_speed}, f)
    m.runtime.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
