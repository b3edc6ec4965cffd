"""torchrun worker (PP=2 x EP=2): DualPipe with and without F&B overlap, every all-to-all delayed by a sleep.

Records, per mode, when each F&B pair's forward half and backward half ran (thread, start, end) and the
step's loss reports, so the test can check that the halves ran concurrently only with overlap on, and that
overlap changes no number."""
import json
import os
import sys
import threading
import time

import torch.distributed as dist
from megatron.core import parallel_state

import megatron_dsv3 as m
from megatron_dsv3.pipeline import dual
from megatron_dsv3.pipeline.placement import build_chunks
from megatron_dsv3.training.step import forward_step
from tests.dist.dualpipe_grads import batches


def delayed(collective, seconds: float):
    def run(*args, **kwargs):
        time.sleep(seconds)  # a slow interconnect: the time one half can hide behind the other's work
        return collective(*args, **kwargs)
    return run


class TimedWork(dual.ModelWork):
    """ModelWork that notes the interval of each half of every F&B pair."""

    halves: list = []

    def pair(self, forward_args, backward_args):
        def timed(fn, kind):
            def run(*args):
                start = time.perf_counter()
                try:
                    return fn(*args)
                finally:
                    TimedWork.halves.append((kind, forward_args[1], start, time.perf_counter(),
                                             threading.current_thread().name))
            return run
        forward, backward = self.forward, self.backward
        self.forward, self.backward = timed(forward, "F"), timed(backward, "B")
        try:
            return super().pair(forward_args, backward_args)
        finally:
            self.forward, self.backward = forward, backward


def main(out_dir: str, delay: float) -> None:
    m.runtime.initialize(pp=2, ep=2, seed=1234)
    dist.all_to_all_single = delayed(dist.all_to_all_single, delay)
    dual.ModelWork = TimedWork
    cfg = m.presets.get_preset("tiny").replace(expert_model_parallel_size=2)
    chunks = build_chunks(cfg, "dualpipe", seed=7)
    dp_rank = parallel_state.get_data_parallel_rank()
    data = batches(cfg, 16, seq=16)[dp_rank * 8:(dp_rank + 1) * 8]
    result = {}
    for overlap in (True, False):
        TimedWork.halves = []
        losses = dual.forward_backward_dual(
            forward_step_func=forward_step, data_iterator=iter(data), model=chunks, num_microbatches=8,
            seq_length=16, micro_batch_size=2, schedule="dualpipe", overlap=overlap)
        result["overlap" if overlap else "sequential"] = {
            "halves": TimedWork.halves, "losses": [[float(v) for v in d["lm loss"]] for d in losses]}
    with open(os.path.join(out_dir, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(result, f)
    m.runtime.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]))
