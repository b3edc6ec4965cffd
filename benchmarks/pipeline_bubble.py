"""Live pipeline bubbles on gloo: 1F1B vs DualPipe side by side, stage costs set by sleeps.

Every rank is a process that runs the same op lists the simulator times, with real point-to-point sends of
activations and gradients between ranks; a forward sleeps F units, a backward B (B - W when its weight part
is deferred), a deferred weight pass W. Measured bubble = max over ranks of (makespan - busy time).

    python benchmarks/pipeline_bubble.py [--unit 0.04] [--pp 4 8]
Prints a table and ends with one JSON line: per PP, measured bubbles, `measured_ratio` (DualPipe / 1F1B)
and `formula_ratio` from the report's Table 2.
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

from megatron_dsv3.pipeline.executor import Executor
from megatron_dsv3.pipeline.schedule import bubble_formula, build

F, B, W, FB = 1.0, 2.0, 1.0, 3.0


class SleepWork:
    """Stage work that only takes time: the activation is a small tensor passed along unchanged."""

    def __init__(self, unit: float):
        self.unit, self.busy = unit, 0.0

    def _sleep(self, units: float) -> None:
        start = time.perf_counter()
        time.sleep(units * self.unit)
        self.busy += time.perf_counter() - start

    def forward(self, chunk, mb, stage, inputs):
        self._sleep(F)
        return torch.full((4,), float(mb)) if inputs is None else inputs

    def backward(self, chunk, mb, stage, grad, split):
        self._sleep(B - W if split else B)
        return torch.full((4,), float(mb)) if grad is None else grad

    def weight(self, chunk, mb, stage):
        self._sleep(W)


def _worker(rank: int, world: int, port: int, schedule: str, microbatches: int, unit: float, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    work = SleepWork(unit)
    executor = Executor(build(schedule, world, microbatches), rank, work, ranks=list(range(world)), shape=(4,))
    dist.barrier()
    start = time.perf_counter()
    executor.run()
    end = torch.tensor([time.perf_counter() - start])
    dist.all_reduce(end, op=dist.ReduceOp.MAX)  # the makespan is the slowest rank's finish
    out.put((rank, end.item(), work.busy))
    dist.destroy_process_group()


def measure(schedule: str, pp: int, microbatches: int, unit: float) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, pp, port, schedule, microbatches, unit, queue)) for r in range(pp)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    makespan = max(r[1] for r in results) / unit
    bubbles = [makespan - busy / unit for _, _, busy in sorted(results)]
    return {"bubble": max(bubbles), "makespan": makespan}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unit", type=float, default=0.04, help="seconds per cost unit (F=1, B=2, W=1, FB=3)")
    parser.add_argument("--pp", type=int, nargs="+", default=[4, 8])
    args = parser.parse_args()
    summary = {}
    print(f"{'pp':>3} {'schedule':>9} {'C':>3} {'measured':>9} {'formula':>8}")
    for pp in args.pp:
        c = 2 * pp
        row = {}
        for schedule in ("1f1b", "dualpipe"):
            got = measure(schedule, pp, c, args.unit)
            formula = bubble_formula(schedule, pp, F, B, W, FB)
            row[schedule] = {"measured_bubble": round(got["bubble"], 3), "formula_bubble": formula,
                             "makespan": round(got["makespan"], 3)}
            print(f"{pp:>3} {schedule:>9} {c:>3} {got['bubble']:>9.2f} {formula:>8.2f}")
        measured = row["dualpipe"]["measured_bubble"] / row["1f1b"]["measured_bubble"]
        formula = row["dualpipe"]["formula_bubble"] / row["1f1b"]["formula_bubble"]
        print(f"    DualPipe / 1F1B bubble: measured {measured:.3f}, formula {formula:.3f}")
        summary[str(pp)] = {**row, "measured_ratio": round(measured, 4), "formula_ratio": round(formula, 4)}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
