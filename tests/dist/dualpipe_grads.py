"""torchrun worker: one DualPipe/DualPipeV forward-backward of the tiny model; per-micro-batch losses and
the gradients of every stage this rank owns, keyed by the one-rank model's parameter names.

With EP > 1 the world is PP x DP (DP = EP): data-parallel rank d runs micro-batches [d*M, (d+1)*M) of one
shared list, and the gradients are brought to the one-rank run over all D*M micro-batches: dense gradients
summed over DP, all divided by D (each rank's loss is a mean over its M micro-batches, the reference's over D*M).
"""
import json
import os
import sys

import torch
from megatron.core import parallel_state

import megatron_dsv3 as m
from megatron_dsv3.pipeline.dual import forward_backward_dual
from megatron_dsv3.pipeline.placement import build_chunks, chunk_stages
from megatron_dsv3.model.init import global_name
from megatron_dsv3.training.step import forward_step


def batches(cfg, count: int, seq: int, mbs: int = 2, seed: int = 11) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        tokens = torch.randint(0, cfg.vocab_size, (mbs, seq + 1), generator=g)
        out.append({"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(mbs, seq),
                    "position_ids": torch.arange(seq).expand(mbs, seq)})
    return out


def main(out_dir: str, schedule: str, layers: int, microbatches: int, forward_only: int, ep: int) -> None:
    world = int(os.environ["WORLD_SIZE"])
    m.runtime.initialize(pp=world // ep, ep=ep, seed=1234)
    pp_rank, pp = parallel_state.get_pipeline_model_parallel_rank(), world // ep
    dp_rank, dp = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    cfg = m.presets.get_preset("tiny").replace(num_hidden_layers=layers, expert_model_parallel_size=ep)
    chunks = build_chunks(cfg, schedule, seed=7)
    for chunk in chunks:  # as Megatron-LM runs: outputs freed once sent, backward through grad_fn alone
        chunk.config.deallocate_pipeline_outputs = True
    data = batches(cfg, microbatches * dp, seq=16)[dp_rank * microbatches:(dp_rank + 1) * microbatches]
    losses = forward_backward_dual(forward_step_func=forward_step, data_iterator=iter(data), model=chunks,
                                   num_microbatches=microbatches, seq_length=16, micro_batch_size=2,
                                   forward_only=bool(forward_only), schedule=schedule)
    owned = [0, 1] if schedule == "dualpipev" else [0]  # DualPipe's chunk 1 is a mirror of another rank's chunk 0
    experts = cfg.n_routed_experts // ep * parallel_state.get_expert_model_parallel_rank()
    grads = {}
    for c in owned:
        stage, stages = chunk_stages(schedule, pp_rank, pp)[c]
        offset = stage * layers // stages
        for name, p in chunks[c].named_parameters():
            if name.startswith("embedding.") and not chunks[c].pre_process:
                continue  # the tied copy: its gradient equals the first stage's
            if p.grad is not None:
                grad = p.grad.clone()
                if getattr(p, "allreduce", True):  # dense: each DP rank saw its own micro-batches
                    torch.distributed.all_reduce(grad, group=parallel_state.get_data_parallel_group())
                grads[global_name(name, offset, experts)] = (grad / dp).reshape(-1).tolist()
    reports = [[float(v) for v in d["lm loss"]] for d in losses]
    with open(os.path.join(out_dir, f"rank{torch.distributed.get_rank()}.json"), "w") as f:
        json.dump({"losses": reports, "grads": grads, "pp_rank": pp_rank, "dp_rank": dp_rank}, f)
    m.runtime.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]),
         int(sys.argv[6]) if len(sys.argv) > 6 else 1)
