"""Megatron-LM integration: the providers `megatron.training.pretrain` takes, so DeepSeek-V3 trains in its loop.

`python -m megatron_dsv3.megatron_lm FLAGS` is Megatron-LM's pretrain_gpt.py with the dsv3 model (patches/ adds
the same to pretrain_gpt.py itself). It runs on GPUs with NCCL and, through `compat.apply_megatron_lm_patches`,
on CPUs with gloo. Without `--data-path` or `--mock-data` it trains on the built-in corpus, in the same sample
order as dsv3-pretrain.
"""
from __future__ import annotations

import argparse
import os
import sys
from functools import partial
from typing import Callable, Optional

import torch
from megatron.core import parallel_state

from megatron_dsv3.cli.errors import UsageError, exit_on_usage_error
from megatron_dsv3.cli.model_config import (apply_dependent_defaults, check_flags, config_from_args,
                                            model_kwargs_from_args)
from megatron_dsv3.cli.parser import assertion_text, dsv3_parser_provider, explicit_dests
from megatron_dsv3.compat import list_balancing_types_for_logging, route_megatron_lm_schedule
from megatron_dsv3.moe.balancing import biased_routers, global_expert_loads
from megatron_dsv3.pipeline.dual import DUAL_SCHEDULES, get_forward_backward_func
from megatron_dsv3.training.step import loss_func, router_names

PROG = "megatron_dsv3.megatron_lm"
_PARSER: dict[str, argparse.ArgumentParser] = {}


def chained_extra_args_provider(existing: Optional[Callable] = None, implied: bool = False) -> Callable:
    """One provider for `parse_and_validate_args`: the script's own (`existing`, may be None), then ours. When
    `implied` or when the command line asks for dsv3, the DeepSeek defaults apply and Megatron-LM's loop gets
    the workarounds it needs to run the dsv3 model here (`compat.apply_megatron_lm_patches`)."""
    from megatron_dsv3.cli.parser import dsv3_requested
    from megatron_dsv3.compat import apply_megatron_lm_patches

    if implied or dsv3_requested(sys.argv[1:]):
        apply_megatron_lm_patches()
    return dsv3_parser_provider(sys.argv[1:], implied=implied, extra=existing, remember=_PARSER)


def _explicit(argv=None) -> set[str]:
    """Dests given on the command line, read with the remembered parser (or a fresh Megatron one)."""
    parser = _PARSER.get("parser")
    if parser is None:
        from megatron.training.arguments import add_megatron_arguments

        from megatron_dsv3.cli.parser import add_dsv3_args
        parser = add_dsv3_args(add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False)))
    return explicit_dests(parser, sys.argv[1:] if argv is None else argv)


def dsv3_config_from_megatron_args(args: argparse.Namespace):
    """The DSV3Config of a Megatron-LM run: `--preset` with every explicitly given flag applied on top."""
    return config_from_args(args, _explicit())


def is_dsv3_requested(args: argparse.Namespace) -> bool:
    """True when the command line asks for this plugin (`--model-spec dsv3` or `--preset`): `--model-spec`
    defaults to dsv3, so a patched pretrain_gpt.py must not switch on the default alone."""
    return bool({"model_spec", "preset"} & _explicit()) and args.model_spec == "dsv3"


def model_provider(pre_process=True, post_process=True, vp_stage=None, config=None, pg_collection=None):
    """megatron.training's model provider: the dsv3 GPTModel for this (virtual) pipeline stage, initialised
    from (seed, global tensor names) as in dsv3-pretrain. `config` and `pg_collection` (from get_model) are
    unused: the shape comes from the flags, the groups from parallel_state."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.training import get_args

    from megatron_dsv3.model.builder import build_model
    from megatron_dsv3.model.init import init_layout_independent
    from megatron_dsv3.pipeline.placement import build_chunks

    args = get_args()
    explicit = _explicit()
    with exit_on_usage_error(PROG):  # a patched pretrain_gpt.py reaches the dsv3 checks only here
        apply_dependent_defaults(args, explicit)
        cfg = config_from_args(args, explicit)
        kwargs = model_kwargs_from_args(args, explicit, cfg)
    if args.pipeline_schedule in DUAL_SCHEDULES:
        install_pipeline_schedule(args.pipeline_schedule)
        chunks = ModelChunks(build_chunks(cfg, args.pipeline_schedule, seed=args.seed, **kwargs))
    else:
        chunks = [build_model(cfg, pre_process=pre_process, post_process=post_process, vp_stage=vp_stage,
                              **kwargs)]
        init_layout_independent(chunks[0], args.seed)
    for chunk in chunks:  # megatron.training fills finalize_model_grads_func only when it is None
        chunk.config.finalize_model_grads_func = wrap_finalize_model_grads(finalize_model_grads, log_moe_metrics)
    list_balancing_types_for_logging(args)
    return chunks if isinstance(chunks, ModelChunks) else chunks[0]


class ModelChunks(list):
    """This rank's two DualPipe(V) chunks. megatron.training's get_model sets `model_type` on what a provider
    returns and then treats a list as the rank's model chunks (each wrapped in DDP), as it does for VPP."""


def install_pipeline_schedule(schedule: str) -> None:
    """Route Megatron-LM's training loop to `schedule` (the DualPipe function accepts its call's keywords)."""
    route_megatron_lm_schedule(get_forward_backward_func(schedule))


_BATCH_KEYS = ("tokens", "labels", "loss_mask", "attention_mask", "position_ids")


def _stage_ends(model) -> tuple[bool, bool]:
    """Whether this chunk is the model's first and last stage: a DualPipe(V) chunk knows its own stage,
    a 1F1B or VPP chunk asks parallel_state."""
    from megatron.core.utils import unwrap_model
    stage = getattr(unwrap_model(model), "dsv3_stage", None)
    if stage is not None:
        return stage[0] == 0, stage[0] == stage[1] - 1
    vp_stage = getattr(unwrap_model(model), "vp_stage", None)
    return (parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage))


def _get_batch(data_iterator, first: bool, last: bool) -> dict:
    """A micro-batch dict; middle pipeline stages get Nones, TP>1 broadcasts from TP rank 0 (megatron-core)."""
    if not (first or last):
        return dict.fromkeys(_BATCH_KEYS)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    batch = next(data_iterator) if tp_rank == 0 else {}
    batch = {k: (batch[k].to(device) if device else batch[k]) if batch.get(k) is not None else None
             for k in _BATCH_KEYS}
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        from megatron.core.utils import get_batch_on_this_tp_rank
        from megatron.training import get_args
        args = get_args()
        batch = get_batch_on_this_tp_rank(
            batch, has_cu_seqlens=False, is_hybrid_cp=False,
            create_attention_mask_in_dataloader=args.create_attention_mask_in_dataloader,
            broadcast_src_rank=parallel_state.get_tensor_model_parallel_src_rank(),
            broadcast_group=parallel_state.get_tensor_model_parallel_group(), cp_size=args.context_parallel_size,
            tp_rank=tp_rank, micro_batch_size=args.micro_batch_size, seq_length=args.seq_length,
            mtp_on_this_rank=last and bool(args.mtp_num_layers),
            pipeline_model_parallel_size=args.pipeline_model_parallel_size,
            is_pipeline_first_stage=first, is_pipeline_last_stage=last)
    return batch


def forward_step(data_iterator, model):
    """Megatron-LM GPT forward_step: (per-token losses, loss_func) with megatron-core's 3-tuple loss contract."""
    batch = _get_batch(data_iterator, *_stage_ends(model))
    output = model(batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"],
                   loss_mask=batch["loss_mask"])
    return output, partial(loss_func, None if batch["loss_mask"] is None else batch["loss_mask"].float())


@torch.no_grad()
def moe_metrics_for_logging(model_chunks, all_reduce: bool = True) -> dict:
    """Per-layer tokens per expert and expert-bias statistics, read from the routers' step counters.

    Call it before megatron-core's finalize_model_grads (which applies the bias update and zeroes the counters),
    i.e. from `wrap_finalize_model_grads`; with all_reduce the loads are summed over TP x DP (collective)."""
    from megatron_dsv3.tracking.moe_metrics import moe_step_metrics

    routers = biased_routers(model_chunks)
    names = router_names(routers)
    if not routers:  # dense model or eval mode
        return {"tokens_per_expert": {}, "expert_bias": {}, "scalars": {}}
    loads = global_expert_loads(routers) if all_reduce else \
        torch.stack([r.local_tokens_per_expert for r in routers]).clone()
    biases = torch.stack([r.expert_bias.detach() for r in routers]).clone()
    return {"tokens_per_expert": dict(zip(names, loads)), "expert_bias": dict(zip(names, biases)),
            "scalars": moe_step_metrics(loads, biases, names)}


def wrap_finalize_model_grads(fn: Callable, on_loads: Callable[[dict], None]) -> Callable:
    """A finalize_model_grads that hands `moe_metrics_for_logging(model)` to `on_loads`, then runs `fn`; install
    it as `config.finalize_model_grads_func` (megatron.training only fills that field when it is None)."""
    def finalize(model, *args, **kwargs):
        on_loads(moe_metrics_for_logging(model))
        return fn(model, *args, **kwargs)
    finalize.__wrapped__ = fn
    return finalize


def log_moe_metrics(metrics: dict) -> None:
    """Megatron-LM's writers get this step's per-layer MaxVio, load and bias statistics (on each log interval);
    rank 0 prints the MaxVio summary next to Megatron-LM's own iteration line."""
    from megatron.training import get_args, get_tensorboard_writer, get_wandb_writer

    args = get_args()
    iteration = getattr(args, "curr_iteration", 0) + 1
    scalars = metrics["scalars"]
    if not scalars or iteration % max(1, args.log_interval):
        return
    writers = [w for w in (get_tensorboard_writer(), get_wandb_writer()) if w is not None]
    for writer in writers:
        if hasattr(writer, "add_scalar"):
            for key, value in scalars.items():
                writer.add_scalar(key, value, iteration)
        else:
            writer.log(scalars, iteration)
    if torch.distributed.get_rank() == 0:
        per_layer = " ".join(f"{key.split('/')[1]}={value:.3f}" for key, value in scalars.items()
                             if key.endswith("/maxvio"))
        print(f" [moe] iteration {iteration:8d} | maxvio mean {scalars['moe/maxvio_mean']:.4f} | "
              f"max {scalars['moe/maxvio_max']:.4f} | {per_layer}", flush=True)


def _builtin_corpus_datasets(train_val_test_num_samples):
    """Train/valid/test over the built-in corpus: dsv3-pretrain's datasets and sample order (as a dataset
    that Megatron-LM's sequential sampler walks), so both loops see the same batches."""
    from megatron.training import get_args

    from megatron_dsv3.data import ShuffledSamples, builtin_datasets

    args = get_args()
    train, valid = builtin_datasets(args.seq_length)
    train_n, valid_n, _ = (int(n or 0) for n in train_val_test_num_samples)
    return (ShuffledSamples(train, args.seed, train_n), ShuffledSamples(valid, args.seed, max(valid_n, 1)), None)


def train_valid_test_datasets_provider(train_val_test_num_samples, vp_stage=None):
    """GPT datasets from `--data-path`/`--split` (or `--mock-data`) through megatron-core's builders, else the
    built-in corpus."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
    from megatron.training import get_args, get_tokenizer
    from megatron.training.utils import get_blend_and_blend_per_split, is_first_or_last_pipeline_stage
    args = get_args()
    blend, blend_per_split = get_blend_and_blend_per_split(args)
    if blend is None and blend_per_split is None and not args.mock_data:
        return _builtin_corpus_datasets(train_val_test_num_samples)
    config = GPTDatasetConfig(
        random_seed=args.seed, sequence_length=args.seq_length, blend=blend, blend_per_split=blend_per_split,
        split=args.split, path_to_cache=args.data_cache_path, mmap_bin_files=args.mmap_bin_files,
        tokenizer=get_tokenizer(), reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask, eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=args.create_attention_mask_in_dataloader)

    def built_here():
        return is_first_or_last_pipeline_stage(vp_stage) and parallel_state.get_tensor_model_parallel_rank() == 0
    kind = MockGPTDataset if args.mock_data else GPTDataset
    return BlendedMegatronDatasetBuilder(kind, train_val_test_num_samples, built_here, config).build()


train_valid_test_datasets_provider.is_distributed = True


def _single_process_env() -> None:
    """Without torchrun, run as the only rank of a one-process group on this machine (Megatron-LM's
    initialize always rendezvous through env://)."""
    import socket
    if "WORLD_SIZE" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def _defaults(argv) -> dict:
    """Megatron-LM's args_defaults for this entry point: pretrain_gpt.py's GPT-2 BPE tokenizer for indexed data,
    Megatron's null tokenizer (the built-in corpus is byte-level) otherwise; an evaluation interval, which
    Megatron-LM 0.19's sample count needs."""
    own_data = any(a.split("=")[0] in ("--data-path", "--train-data-path", "--mock-data") for a in argv)
    return {"tokenizer_type": "GPT2BPETokenizer" if own_data else "NullTokenizer", "eval_interval": 1000}


def parse_args(argv=None) -> argparse.Namespace:
    """Megatron-LM's parse_and_validate_args with the dsv3 flags and defaults; bad flags raise UsageError."""
    from megatron.training.arguments import parse_and_validate_args

    from megatron_dsv3.cli.parser import parse_megatron_args

    argv = sys.argv[1:] if argv is None else list(argv)
    unchecked, explicit = parse_megatron_args(argv)  # the dsv3 spec's refusals before Megatron-LM's checks
    apply_dependent_defaults(unchecked, explicit)
    check_flags(unchecked, explicit, config_from_args(unchecked, explicit))
    try:
        args = parse_and_validate_args(extra_args_provider=chained_extra_args_provider(None, implied=True),
                                       args_defaults=_defaults(argv))
    except AssertionError as err:
        raise UsageError(f"Megatron-LM rejects the flags: {assertion_text(err)}") from None
    explicit = _explicit(argv)
    apply_dependent_defaults(args, explicit)
    model_kwargs_from_args(args, explicit, config_from_args(args, explicit))  # refuse bad flags before starting
    return args


def main() -> None:
    """Entry point equivalent to Megatron-LM's pretrain_gpt.py with the dsv3 model."""
    from megatron_dsv3.notices import quiet_third_party
    from megatron_dsv3.compat import apply_megatron_lm_patches

    quiet_third_party()
    with exit_on_usage_error(PROG):
        apply_megatron_lm_patches()
        _single_process_env()
        args = parse_args()
    from megatron.core.enums import ModelType
    from megatron.training import pretrain
    from megatron.training.argument_utils import pretrain_cfg_container_from_args
    pretrain(pretrain_cfg_container_from_args(args), train_valid_test_datasets_provider, ModelType.encoder_or_decoder,
             forward_step, model_provider=model_provider)


if __name__ == "__main__":
    main()
