"""dsv3-pretrain with a NaN written into one weight just before step K (argv[1]); the rest of argv is the CLI."""
import sys

import torch

import megatron_dsv3.training.trainer as trainer
from megatron_dsv3.training.pretrain import main

real_step = trainer.train_step
calls = {"n": 0}


def poisoned_step(model_chunks, *args, **kwargs):
    calls["n"] += 1
    if calls["n"] == int(sys.argv[1]):
        with torch.no_grad():
            next(model_chunks[0].parameters()).view(-1)[0] = float("nan")
    return real_step(model_chunks, *args, **kwargs)


if __name__ == "__main__":  # megatron-core's checkpoint writer spawns processes that import this file
    trainer.train_step = poisoned_step
    main(sys.argv[2:])
