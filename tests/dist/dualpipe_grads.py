"""torchrun worker: one DualPipe/DualPipeV forward-backward of the tiny model; per-micro-batch losses and
the gradients of every stage this rank owns, keyed by the one-rank model's parameter names."""
import json
import os
import sys

import torch

import megatron_dsv3 as m
from megatron_dsv3.pipeline.dual import forward_backward_dual
from megatron_dsv3.pipeline.placement import build_chunks, chunk_stages
from megatron_dsv3.training.init import global_name
from megatron_dsv3.training.step import forward_step


def batches(cfg, count: int, seq: int, mbs: int = 2, seed: int = 11) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        tokens = torch.randint(0, cfg.vocab_size, (mbs, seq + 1), generator=g)
        out.append({"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(mbs, seq),
                    "position_ids": torch.arange(seq).expand(mbs, seq)})
    return out


def main(out_dir: str, schedule: str, layers: int, microbatches: int, forward_only: int) -> None:
    world = int(os.environ["WORLD_SIZE"])
    m.runtime.initialize(pp=world, seed=1234)
    cfg = m.presets.get_preset("tiny").replace(num_hidden_layers=layers)
    chunks = build_chunks(cfg, schedule, seed=7)
    data = batches(cfg, microbatches, seq=16)
    losses = forward_backward_dual(forward_step_func=forward_step, data_iterator=iter(data), model=chunks,
                                   num_microbatches=microbatches, seq_length=16, micro_batch_size=2,
                                   forward_only=bool(forward_only), schedule=schedule)
    rank = torch.distributed.get_rank()
    owned = [0, 1] if schedule == "dualpipev" else [0]  # DualPipe's chunk 1 is a mirror of another rank's chunk 0
    grads = {}
    for c in owned:
        stage, stages = chunk_stages(schedule, rank, world)[c]
        offset = stage * layers // stages
        for name, p in chunks[c].named_parameters():
            if name.startswith("embedding.") and not chunks[c].pre_process:
                continue  # borrowed from the other chunk
            if p.grad is not None:
                grads[global_name(name, offset, 0)] = p.grad.reshape(-1).tolist()
    reports = [[float(v) for v in d["lm loss"]] for d in losses]
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"losses": reports, "grads": grads}, f)
    m.runtime.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
