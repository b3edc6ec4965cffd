"""Quick start: build the tiny DeepSeek-V3, train it for a few steps on CPU, print the losses.

Run with `make run`. A stand-in for the full `dsv3-pretrain` job (built-in corpus, checkpoints, wandb).
"""
import torch

import megatron_dsv3 as m
from megatron_dsv3.moe.balancing import update_expert_bias


def main(steps: int = 40) -> None:
    m.runtime.initialize(seed=1234)
    cfg = m.presets.get_preset("tiny")
    model = m.build_model(cfg)
    print(f"tiny DeepSeek-V3: {sum(p.numel() for p in model.parameters()):,} parameters")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    # A fixed, learnable batch: each sequence counts upward, so next-token prediction is easy to fit.
    starts = torch.randint(0, cfg.vocab_size, (4, 1))
    ids = (starts + torch.arange(64)) % cfg.vocab_size
    positions = torch.arange(64).expand_as(ids)
    for step in range(1, steps + 1):
        loss = model(ids, positions, None, labels=torch.roll(ids, -1, dims=1)).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        loads = update_expert_bias([model])
        if step == 1 or step % 10 == 0:
            imbalance = (loads.max(dim=1).values / loads.mean(dim=1)).max().item()
            print(f"step {step:3d}  lm loss {loss.item():.4f}  max expert load / mean {imbalance:.2f}")
    m.runtime.shutdown()


if __name__ == "__main__":
    main()
