"""Megatron-LM integration: the providers `megatron.training.pretrain` takes, so DeepSeek-V3 trains in its loop.
`main()` is a drop-in for Megatron-LM's pretrain_gpt.py; patches/ adds the same to pretrain_gpt.py itself."""
from __future__ import annotations

import argparse
import sys
from functools import partial
from typing import Callable, Optional

import torch
from megatron.core import parallel_state

from megatron_dsv3.compat import route_megatron_lm_schedule
from megatron_dsv3.moe.balancing import biased_routers, global_expert_loads
from megatron_dsv3.pipeline.dual import DUAL_SCHEDULES, get_forward_backward_func
from megatron_dsv3.pipeline.placement import build_chunks
from megatron_dsv3.training.arguments import (_DIRECT, _YARN, add_dsv3_args, chain_providers, config_from_args,
                                              explicit_dests)
from megatron_dsv3.training.step import loss_func, router_names

_PARSER: dict[str, argparse.ArgumentParser] = {}
_BACKENDS = {"local": "local", "transformer_engine": "te"}


def _preset_defaults(parser: argparse.ArgumentParser, argv) -> None:
    """With `--preset NAME`, the preset's shape becomes the parser defaults, so Megatron's checks and FLOP
    counts see the DeepSeek shape while explicitly given flags still win."""
    from megatron_dsv3.presets import PRESETS, get_preset
    argv = list(argv)
    name = next((a.split("=", 1)[1] for a in argv if a.startswith("--preset=")), None)
    name = argv[argv.index("--preset") + 1] if name is None and "--preset" in argv[:-1] else name
    if name not in PRESETS:
        return  # unknown names are reported by config_from_args, naming the flag
    cfg = get_preset(name)
    values = {dest: getattr(cfg, field) for dest, field in _DIRECT.items()}
    values["mtp_num_layers"] = cfg.num_nextn_predict_layers or None
    if cfg.rope_scaling is not None:
        values.update({dest: getattr(cfg.rope_scaling, field) for dest, field in _YARN.items()})
    k = cfg.first_k_dense_replace
    values.update(multi_latent_attention=True, normalization="RMSNorm", swiglu=True, position_embedding_type="rope",
                  rope_type="yarn" if cfg.rope_scaling else "rope",
                  untie_embeddings_and_output_weights=not cfg.tie_word_embeddings,
                  moe_layer_freq=[0] * k + [1] * (cfg.num_hidden_layers - k) if cfg.n_routed_experts else 1,
                  moe_shared_expert_intermediate_size=(cfg.n_shared_experts * cfg.moe_intermediate_size) or None)
    known = {a.dest for a in parser._actions}
    parser.set_defaults(**{d: v for d, v in values.items() if d in known})


def extra_args_provider(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds `--model-spec`, `--preset`, `--dsv3-backend` (and YaRN flags Megatron lacks); remembers the parser."""
    parser = add_dsv3_args(parser)
    _preset_defaults(parser, sys.argv[1:])
    _PARSER["parser"] = parser
    return parser


def chained_extra_args_provider(existing: Optional[Callable] = None) -> Callable:
    """One provider for `parse_and_validate_args`: the script's own (`existing`, may be None), then ours."""
    return chain_providers(existing, extra_args_provider)


def _explicit(argv=None) -> set[str]:
    """Dests given on the command line, read with the remembered parser (or a fresh Megatron one)."""
    parser = _PARSER.get("parser")
    if parser is None:
        from megatron.training.arguments import add_megatron_arguments
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
    """megatron.training's model provider: the dsv3 GPTModel for this (virtual) pipeline stage. `config` and
    `pg_collection` (from get_model) are unused: the shape comes from the flags, groups from parallel_state."""
    from megatron.training import get_args

    from megatron_dsv3 import build_model
    args = get_args()
    backend = args.dsv3_backend
    if backend is None and "transformer_impl" in _explicit():
        backend = _BACKENDS.get(args.transformer_impl)  # Megatron's default (TE) is not taken as a request
    overrides = {k: getattr(args, k) for k in ("bf16", "fp16", "params_dtype", "sequence_parallel")
                 if getattr(args, k, None) is not None}
    cfg = dsv3_config_from_megatron_args(args)
    if args.pipeline_schedule in DUAL_SCHEDULES:
        install_pipeline_schedule(args.pipeline_schedule)
        return ModelChunks(build_chunks(cfg, args.pipeline_schedule, seed=args.seed, backend=backend, **overrides))
    return build_model(cfg, backend=backend, pre_process=pre_process, post_process=post_process, vp_stage=vp_stage,
                       **overrides)


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
    return finalize


def train_valid_test_datasets_provider(train_val_test_num_samples, vp_stage=None):
    """GPT datasets from `--data-path`/`--split` (or `--mock-data`) through megatron-core's builders."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
    from megatron.training import get_args, get_tokenizer
    from megatron.training.utils import get_blend_and_blend_per_split, is_first_or_last_pipeline_stage
    args = get_args()
    blend, blend_per_split = get_blend_and_blend_per_split(args)
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


def main() -> None:
    """Entry point equivalent to Megatron-LM's pretrain_gpt.py with the dsv3 model (needs CUDA, as Megatron does)."""
    from megatron.core.enums import ModelType
    from megatron.training import pretrain
    from megatron.training.argument_utils import pretrain_cfg_container_from_args
    from megatron.training.arguments import parse_and_validate_args
    args = parse_and_validate_args(extra_args_provider=chained_extra_args_provider(None),
                                   args_defaults={"tokenizer_type": "GPT2BPETokenizer"})
    pretrain(pretrain_cfg_container_from_args(args), train_valid_test_datasets_provider, ModelType.encoder_or_decoder,
             forward_step, model_provider=model_provider)


if __name__ == "__main__":
    main()
