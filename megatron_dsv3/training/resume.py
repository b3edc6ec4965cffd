"""Resuming a run as Megatron-LM does: the checkpoint's LR schedule must agree with the flags' unless
`--override-opt_param-scheduler` (follow the flags) or `--use-checkpoint-opt_param-scheduler` (follow the
checkpoint) says which wins; a disagreement is reported in one line before any weight is loaded."""
from __future__ import annotations

from megatron_dsv3.cli.errors import UsageError

# OptimizerParamScheduler.state_dict() key -> the flags that set it.
_FLAGS = {
    "max_lr": "--lr", "min_lr": "--min-lr", "lr_warmup_steps": "--lr-warmup-iters",
    "lr_decay_steps": "--train-iters / --lr-decay-iters", "lr_decay_style": "--lr-decay-style",
    "start_wd": "--weight-decay / --start-weight-decay", "end_wd": "--weight-decay / --end-weight-decay",
    "wd_incr_steps": "--train-iters", "wd_incr_style": "--weight-decay-incr-style",
}


def check_resumed_schedule(saved: dict, scheduler, args, global_batch_size: int) -> None:
    """Refuse a resume whose flags describe another LR schedule than the checkpoint's, naming the flag."""
    if not saved or args.override_opt_param_scheduler or args.use_checkpoint_opt_param_scheduler:
        return
    mine = scheduler.state_dict()
    for key, flag in _FLAGS.items():
        if key in saved and saved[key] != mine.get(key):
            old, new = saved[key], mine.get(key)
            if key.endswith("_steps"):  # kept in samples; the flags count iterations
                old, new = f"{old // global_batch_size} iterations", f"{new // global_batch_size} iterations"
            raise UsageError(f"{flag}: the checkpoint's LR schedule has {key} = {old}, the flags give {new}; "
                             "pass --override-opt_param-scheduler to follow the flags (a longer --train-iters then "
                             "continues at the new schedule's LR) or --use-checkpoint-opt_param-scheduler to keep "
                             "the checkpoint's")
