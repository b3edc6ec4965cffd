"""`dsv3-pretrain`: train DeepSeek-V3 with megatron-core on CPU (gloo) or GPUs (NCCL), one process or torchrun.

Megatron-LM's flags plus `--model-spec dsv3` and `--preset`; ends by printing one JSON line of results.
"""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

from megatron_dsv3.cli.errors import UsageError, exit_on_usage_error
from megatron_dsv3.cli.model_config import (apply_dependent_defaults, check_flags, config_from_args, flag,
                                            model_kwargs_from_args)
from megatron_dsv3.cli.parser import parse_megatron_args, validate_megatron_args
from megatron_dsv3.notices import quiet_third_party

PROG = "dsv3-pretrain"


@dataclass(frozen=True)
class TrainSettings:
    """The run's schedule, validated once from Megatron-LM's flags."""

    seq_length: int
    micro_batch_size: int
    global_batch_size: int
    num_microbatches: int
    train_iters: int
    lr: float
    min_lr: float
    lr_warmup_iters: int
    lr_decay_style: str
    weight_decay: float
    adam_beta1: float
    adam_beta2: float
    clip_grad: float
    seed: int
    log_interval: int
    eval_interval: Optional[int]
    eval_iters: int
    save: Optional[str]
    save_interval: Optional[int]
    load: Optional[str]
    exit_interval: Optional[int]
    pipeline_schedule: str = "1f1b"
    partial_load: bool = False  # --dist-ckpt-strictness ignore_all (or another lenient one) given explicitly


def _check_pipeline_schedule(args, cfg, num_microbatches: int) -> None:
    """DualPipe(V) needs two chunks per rank, an even PP for DualPipe, enough micro-batches and layers."""
    from megatron_dsv3.pipeline.placement import chunk_stages
    from megatron_dsv3.pipeline.schedule import build

    schedule, pp = args.pipeline_schedule, cfg.pipeline_model_parallel_size
    if schedule == "1f1b":
        return
    if pp < 2:
        raise UsageError(f"--pipeline-schedule {schedule}: needs --pipeline-model-parallel-size >= 2, got {pp}")
    if any(getattr(args, k, None) for k in ("virtual_pipeline_model_parallel_size",
                                            "num_layers_per_virtual_pipeline_stage")):
        raise UsageError(f"--pipeline-schedule {schedule}: places its own two chunks per rank; drop the "
                         "virtual-pipeline flags")
    try:
        build(schedule, pp, num_microbatches)
    except ValueError as err:
        raise UsageError(f"{err} (micro-batches = --global-batch-size / (--micro-batch-size x data-parallel size))"
                         ) from None
    stages = chunk_stages(schedule, 0, pp)[0][1]
    try:
        cfg.replace(pipeline_model_parallel_size=stages)
    except ValueError as err:
        raise UsageError(f"--pipeline-schedule {schedule}: {stages} pipeline stages: {err}") from None


# Flags whose value must be a positive number, a non-negative one, or a finite float.
_POSITIVE = ("micro_batch_size", "global_batch_size", "log_interval", "save_interval", "eval_interval",
             "exit_interval", "lr_decay_iters", "seed", "moe_expert_capacity_factor")
_NON_NEGATIVE = ("eval_iters", "lr_warmup_iters", "min_lr", "weight_decay", "clip_grad", "adam_eps", "lr_warmup_init")
_FINITE = ("lr", "min_lr", "weight_decay", "clip_grad", "adam_beta1", "adam_beta2", "adam_eps", "init_method_std",
           "hidden_dropout", "attention_dropout", "moe_z_loss_coeff", "moe_expert_capacity_factor",
           "moe_router_bias_update_rate", "mtp_loss_scaling_factor", "lr_warmup_init")


def _check_values(args) -> None:
    """Values that cannot be right are refused before any work: sizes and counts, NaN/Inf, probabilities."""
    for dest in _FINITE:
        value = getattr(args, dest, None)
        if value is not None and not math.isfinite(value):
            raise UsageError(f"{flag(dest)}: must be a finite number, got {value}")
    for dest in _POSITIVE:
        value = getattr(args, dest, None)
        if value is not None and value <= 0:
            raise UsageError(f"{flag(dest)}: must be > 0, got {value}")
    for dest in _NON_NEGATIVE:
        value = getattr(args, dest, None)
        if value is not None and value < 0:
            raise UsageError(f"{flag(dest)}: must be >= 0, got {value}")
    for dest in ("adam_beta1", "adam_beta2", "hidden_dropout", "attention_dropout"):
        value = getattr(args, dest, None)
        if value is not None and not 0 <= value < 1:
            raise UsageError(f"{flag(dest)}: must be in [0, 1), got {value}")
    if args.sequence_parallel and args.tensor_model_parallel_size == 1:
        raise UsageError("--sequence-parallel: splits activations over tensor-parallel ranks; needs "
                         "--tensor-model-parallel-size > 1")
    if args.context_parallel_size != 1:
        raise UsageError(f"--context-parallel-size: {args.context_parallel_size}: the dsv3 spec's MLA has no "
                         "context parallelism on the local backend; use 1")


def _settings(args, data_parallel_size: int, explicit: frozenset = frozenset()) -> TrainSettings:
    if args.train_iters is None or args.train_iters <= 0:
        raise UsageError("--train-iters: required, a positive number of optimizer steps")
    if args.seq_length is None or args.seq_length <= 0:
        raise UsageError("--seq-length: required, a positive sequence length in tokens")
    _check_values(args)
    mbs = 1 if args.micro_batch_size is None else args.micro_batch_size
    gbs = args.global_batch_size or mbs * data_parallel_size
    if mbs <= 0 or gbs <= 0 or gbs % (mbs * data_parallel_size):
        raise UsageError(f"--global-batch-size: {gbs} must be a positive multiple of --micro-batch-size ({mbs}) "
                         f"x data-parallel size ({data_parallel_size})")
    if args.save_interval is not None and args.save is None:
        raise UsageError("--save-interval: needs --save DIR")
    lr = 1e-3 if args.lr is None else args.lr
    if lr <= 0:
        raise UsageError(f"--lr: must be > 0, got {lr}")
    return TrainSettings(
        seq_length=args.seq_length, micro_batch_size=mbs, global_batch_size=gbs,
        num_microbatches=gbs // (mbs * data_parallel_size), train_iters=args.train_iters, lr=lr,
        min_lr=args.min_lr, lr_warmup_iters=args.lr_warmup_iters, lr_decay_style=args.lr_decay_style,
        weight_decay=args.weight_decay, adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2,
        clip_grad=args.clip_grad, seed=args.seed, log_interval=args.log_interval, eval_interval=args.eval_interval,
        eval_iters=args.eval_iters, save=args.save, save_interval=args.save_interval, load=args.load,
        exit_interval=args.exit_interval, pipeline_schedule=args.pipeline_schedule,
        partial_load="dist_ckpt_strictness" in explicit and args.dist_ckpt_strictness != "raise_all")


def _world_sizes(cfg) -> int:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    model_parallel = cfg.tensor_model_parallel_size * cfg.pipeline_model_parallel_size
    if world % model_parallel:
        raise UsageError(f"--tensor-model-parallel-size x --pipeline-model-parallel-size = {model_parallel} "
                         f"does not divide the number of processes ({world})")
    dp = world // model_parallel
    if dp % cfg.expert_model_parallel_size:
        raise UsageError(f"--expert-model-parallel-size: {cfg.expert_model_parallel_size} does not divide the "
                         f"data-parallel size {dp}")
    return dp


def prepare(argv: Sequence[str]):
    """Parse and check the command line: (DSV3Config, TrainSettings, Megatron-LM args, build_model kwargs)."""
    args, explicit = parse_megatron_args(argv)
    cfg = config_from_args(args, explicit)
    dp = _world_sizes(cfg)
    settings = _settings(args, dp, frozenset(explicit))
    if settings.seq_length > cfg.max_position_embeddings:
        raise UsageError(f"--seq-length: {settings.seq_length} tokens exceed the model's position limit "
                         f"--max-position-embeddings {cfg.max_position_embeddings}")
    _check_pipeline_schedule(args, cfg, settings.num_microbatches)
    args.micro_batch_size, args.global_batch_size, args.lr = (settings.micro_batch_size,
                                                              settings.global_batch_size, settings.lr)
    if args.save and args.save_interval is None:
        args.save_interval = settings.train_iters  # Megatron-LM wants one; dsv3-pretrain saves at the end anyway
    apply_dependent_defaults(args, explicit)
    check_flags(args, explicit, cfg)  # the dsv3 spec's refusals come before Megatron-LM's own checks
    validate_megatron_args(args)
    model_kwargs = model_kwargs_from_args(args, explicit, cfg)  # backend, FP8 and every megatron-core field
    return cfg, settings, args, model_kwargs


def run(argv: Sequence[str]) -> dict:
    """Parse, build, train, checkpoint; returns the summary that is printed as JSON."""
    from megatron_dsv3.training.trainer import Trainer

    trainer = Trainer(*prepare(argv))
    try:
        return trainer.train()
    finally:
        trainer.close()


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console entry point: bad input ends with one line on stderr and exit code 2."""
    quiet_third_party()
    from megatron_dsv3.checkpoint.dist import CheckpointError
    from megatron_dsv3.training.trainer import TrainingDiverged

    with exit_on_usage_error(PROG, CheckpointError, TrainingDiverged):
        summary = run(sys.argv[1:] if argv is None else argv)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
