"""Checkpoint-test helpers: tiny model + megatron DDP + megatron Adam + scheduler, one training step."""
import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

import megatron_dsv3 as m
from megatron_dsv3.moe.balancing import update_expert_bias


def build(cfg):
    """(ddp_model, megatron optimizer, scheduler) for `cfg`, on the current parallel state."""
    model = m.build_model(cfg, backend="local")
    ddp = DistributedDataParallel(
        model.config,
        DistributedDataParallelConfig(grad_reduce_in_fp32=False, overlap_grad_reduce=False,
                                      use_distributed_optimizer=False),
        model,
    )
    config = OptimizerConfig(optimizer="adam", lr=1e-3, min_lr=1e-5, bf16=False, fp16=False,
                             params_dtype=torch.float32, use_distributed_optimizer=False)
    optimizer = get_megatron_optimizer(config, [ddp])
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=1e-4, max_lr=1e-3, min_lr=1e-5, lr_warmup_steps=2, lr_decay_steps=20,
        lr_decay_style="cosine", start_wd=0.01, end_wd=0.01, wd_incr_steps=20, wd_incr_style="constant")
    return ddp, optimizer, scheduler


def batch(cfg, step: int, rank: int = 0, seq: int = 16):
    """Deterministic token ids for `step` (independent of the global RNG)."""
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, cfg.vocab_size, (2, seq), generator=gen)


def train_step(ddp, optimizer, scheduler, ids) -> float:
    """Forward, backward, grad sync, Adam step, scheduler step, expert-bias update; returns the loss."""
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    seq = ids.shape[1]
    loss = ddp(ids, torch.arange(seq).expand_as(ids), None, labels=torch.roll(ids, -1, 1)).mean()
    loss.backward()
    ddp.finish_grad_sync()
    optimizer.step()
    scheduler.step(increment=1)
    update_expert_bias([ddp.module])
    return loss.item()


def expert_biases(ddp) -> dict:
    return {n: b.detach().clone() for n, b in ddp.module.named_buffers() if n.endswith("expert_bias")}
