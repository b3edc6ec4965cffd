"""The console scripts' entry points: each command is imported with the garbage collector paused, and what the
imports built is then frozen. torch, PyTorch DCP and megatron-core create ~10^6 long-lived objects and no
garbage while they load; collecting them meanwhile took 0.3 s of every dsv3-convert start, and later
collections skip them too."""
from __future__ import annotations

import gc
import importlib


def _start(target: str):
    module, _, name = target.partition(":")
    enabled = gc.isenabled()
    gc.disable()
    try:
        command = getattr(importlib.import_module(module), name)
    finally:
        gc.freeze()
        if enabled:
            gc.enable()
    return command()


def pretrain():
    return _start("megatron_dsv3.training.pretrain:main")


def convert():
    return _start("megatron_dsv3.checkpoint.convert:cli")


def generate():
    return _start("megatron_dsv3.inference.cli:cli")


def eplb():
    return _start("megatron_dsv3.inference.eplb_cli:main")
