"""DualPipe's F&B overlap on gloo: step time with and without it, side by side, under a slow all-to-all.

PP=2 x EP=2 (4 processes) train the tiny DeepSeek-V3 model (MoE on every layer but the first, MTP); every
expert-parallel all-to-all first sleeps `--latency` seconds, standing in for a cross-node interconnect. With
overlap, each F&B pair runs one chunk's forward on a helper thread while the other chunk's backward runs, each
chunk on its own communicators, so one half's dispatch/combine wait hides behind the other half's work.

    python benchmarks/ep_overlap.py [--latency 0.02] [--steps 3] [--microbatches 8]
Ends with one JSON line: seconds per step for each mode and `overlapped_over_sequential`.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _batches(vocab: int, count: int, seq: int = 32, mbs: int = 2) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        tokens = torch.randint(0, vocab, (mbs, seq + 1), generator=g)
        out.append({"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(mbs, seq),
                    "position_ids": torch.arange(seq).expand(mbs, seq)})
    return out


def _worker(rank: int, port: int, latency: float, steps: int, microbatches: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="4",
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import megatron_dsv3 as m
    from megatron_dsv3.pipeline.dual import forward_backward_dual
    from megatron_dsv3.pipeline.placement import build_chunks
    from megatron_dsv3.training.step import forward_step

    m.runtime.initialize(pp=2, ep=2, seed=1234)
    collective = dist.all_to_all_single

    def slow_all_to_all(*args, **kwargs):
        time.sleep(latency)
        return collective(*args, **kwargs)

    dist.all_to_all_single = slow_all_to_all
    cfg = m.presets.get_preset("tiny").replace(expert_model_parallel_size=2)
    chunks = build_chunks(cfg, "dualpipe", seed=7)
    data = _batches(cfg.vocab_size, microbatches)
    times = {True: [], False: []}
    for step in range(2 * steps + 2):
        overlap = step % 2 == 0  # alternate, so load changes on the machine hit both modes alike
        dist.barrier()
        start = time.perf_counter()
        forward_backward_dual(forward_step_func=forward_step, data_iterator=iter(data), model=chunks,
                              num_microbatches=microbatches, seq_length=32, micro_batch_size=2,
                              schedule="dualpipe", overlap=overlap)
        elapsed = torch.tensor([time.perf_counter() - start])
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        if step >= 2:  # the first of each mode warms up
            times[overlap].append(elapsed.item())
    if rank == 0:
        out.put({mode: sum(t) / len(t) for mode, t in times.items()})
    m.runtime.shutdown()


def measure(latency: float, steps: int, microbatches: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, port, latency, steps, microbatches, queue)) for r in range(4)]
    for p in procs:
        p.start()
    result = queue.get(timeout=1200)
    for p in procs:
        p.join()
    return {"latency_s": latency, "sequential_s_per_step": result[False], "overlapped_s_per_step": result[True],
            "overlapped_over_sequential": result[True] / result[False]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.02, help="seconds added to every all-to-all")
    parser.add_argument("--steps", type=int, default=2, help="measured steps per mode")
    parser.add_argument("--microbatches", type=int, default=20, help="per step (the report's Table 2 uses 20)")
    args = parser.parse_args()
    result = measure(args.latency, args.steps, args.microbatches)
    print(f"latency {result['latency_s'] * 1e3:.0f} ms per all-to-all: sequential "
          f"{result['sequential_s_per_step']:.2f} s/step, overlapped {result['overlapped_s_per_step']:.2f} s/step, "
          f"ratio {result['overlapped_over_sequential']:.3f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
