"""torchrun worker: EP-sharded save, then load into a fresh model; writes what matched on this rank."""
import json
import os
import sys

import torch

import megatron_dsv3 as m
from megatron_dsv3.checkpoint.dist import load_checkpoint, save_checkpoint
from tests.dist.ckpt_common import batch, build, train_step


def snapshot(ddp, opt):
    names = {id(p): n for n, p in ddp.module.named_parameters()}
    out = {n: t.detach().clone() for n, t in ddp.module.state_dict().items() if isinstance(t, torch.Tensor)}
    for o in opt.chained_optimizers:
        for p, s in o.optimizer.state.items():
            out[f"adam:{names[id(p)]}"] = s["exp_avg"].clone()
    return out


def main(out_dir: str, ep: int) -> None:
    m.runtime.initialize(ep=ep, seed=1234)
    rank = torch.distributed.get_rank()
    cfg = m.presets.get_preset("tiny").replace(expert_model_parallel_size=ep)
    ddp, opt, sched = build(cfg)
    for step in range(2):
        train_step(ddp, opt, sched, batch(cfg, step, rank))
    saved = snapshot(ddp, opt)
    save_checkpoint(os.path.join(out_dir, "ckpt"), 2, [ddp], opt, sched, {"consumed_samples": 8})

    torch.manual_seed(500 + rank)
    ddp2, opt2, sched2 = build(cfg)
    train_step(ddp2, opt2, sched2, batch(cfg, 9, rank))  # creates Adam state to be overwritten
    fresh = snapshot(ddp2, opt2)
    state = load_checkpoint(os.path.join(out_dir, "ckpt"), [ddp2], opt2, sched2)
    got = snapshot(ddp2, opt2)
    experts = sorted(k for k in saved if "local_experts" in k and not k.startswith("adam:"))
    digest = float(sum(saved[k].double().sum() for k in experts))
    differ = [k for k in saved if k in got and not torch.equal(saved[k], got[k])]
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({
            "checked": len(saved),
            "mismatched": sorted(set(saved) ^ set(got)) + differ,
            "experts_checked": len(experts),
            "bias_checked": sum(k.endswith("expert_bias") for k in saved),
            "changed_by_load": sum(not torch.equal(fresh[k], got[k]) for k in got if k in fresh),
            "expert_digest": digest,
            "train_state": state,
        }, f)
    m.runtime.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
