"""The training run behind `dsv3-pretrain`: megatron-core DDP, optimizer, LR schedule, checkpoints, tracking."""
from __future__ import annotations

import dataclasses
import time
from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import Float16Module
from tqdm import tqdm

from megatron_dsv3 import runtime
from megatron_dsv3.checkpoint.dist import load_checkpoint, save_checkpoint
from megatron_dsv3.model.builder import build_model
from megatron_dsv3.pipeline.dual import DUAL_SCHEDULES, get_forward_backward_func
from megatron_dsv3.pipeline.placement import build_chunks
from megatron_dsv3.training import data
from megatron_dsv3.training.arguments import UsageError
from megatron_dsv3.training.init import init_layout_independent
from megatron_dsv3.training.step import LoadCapture, evaluate, moe_and_mtp_metrics, train_step


class HFTokenizer:
    """A local Hugging Face tokenizer in the interface the datasets use (tokenize, eod, vocab_size)."""

    def __init__(self, path: str):
        try:
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as err:  # transformers raises many types for a bad path
            raise UsageError(f"--tokenizer-model: cannot load a Hugging Face tokenizer from {path!r} ({err})") from None
        self.eod = self._tok.eos_token_id if self._tok.eos_token_id is not None else 0
        self.pad = self._tok.pad_token_id if self._tok.pad_token_id is not None else self.eod
        self.vocab_size = len(self._tok)
        self.unique_identifiers = {"class": "HFTokenizer", "path": path}

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def detokenize(self, ids) -> str:
        return self._tok.decode(ids)


def make_tokenizer(args):
    """Byte-level by default; `--tokenizer-type HuggingFaceTokenizer --tokenizer-model PATH` otherwise."""
    if args.tokenizer_type in (None, "ByteTokenizer"):
        return data.ByteTokenizer()
    if args.tokenizer_type == "HuggingFaceTokenizer":
        if not args.tokenizer_model:
            raise UsageError("--tokenizer-model: required with --tokenizer-type HuggingFaceTokenizer")
        return HFTokenizer(args.tokenizer_model)
    raise UsageError(f"--tokenizer-type: {args.tokenizer_type!r} is not supported; use ByteTokenizer (default) "
                     "or HuggingFaceTokenizer")


class Trainer:
    """Builds everything once, then `train()` runs the steps; rank 0 logs and reports."""

    def __init__(self, cfg, settings, args, model_kwargs: Optional[dict] = None):
        self.cfg, self.settings, self.args = cfg, settings, args
        self.tokenizer = make_tokenizer(args)
        if self.tokenizer.vocab_size > cfg.vocab_size:
            raise UsageError(f"--vocab-size: the model's vocabulary ({cfg.vocab_size}) is smaller than the "
                             f"tokenizer's ({self.tokenizer.vocab_size})")
        self.train_data, self.valid_data = self._datasets()
        runtime.initialize(tp=cfg.tensor_model_parallel_size, pp=cfg.pipeline_model_parallel_size,
                           ep=cfg.expert_model_parallel_size, seed=settings.seed)
        self.rank = torch.distributed.get_rank()
        bf16 = bool(getattr(args, "bf16", False))
        # BF16 as on GPUs: weight gradients accumulate into FP32 main_grad inside the GEMM (megatron-core's
        # gradient-accumulation fusion), not rounded to BF16 first.
        precision = {"bf16": True, "params_dtype": torch.bfloat16, "gradient_accumulation_fusion": True} \
            if bf16 else {}
        chunks = self._build_chunks({**(model_kwargs or {"backend": args.dsv3_backend}), **precision})
        if bf16:  # Megatron-LM's --bf16: BF16 weights and compute, FP32 main weights in the optimizer
            chunks = [Float16Module(chunk.config, chunk) for chunk in chunks]
        self.model_chunks = [
            DistributedDataParallel(chunk.config, DistributedDataParallelConfig(
                grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False), chunk)
            for chunk in chunks]
        self.forward_backward = get_forward_backward_func(settings.pipeline_schedule)
        self.optimizer = get_megatron_optimizer(OptimizerConfig(
            optimizer="adam", lr=settings.lr, min_lr=settings.min_lr, weight_decay=settings.weight_decay,
            adam_beta1=settings.adam_beta1, adam_beta2=settings.adam_beta2, clip_grad=settings.clip_grad,
            bf16=bf16, fp16=False, params_dtype=torch.bfloat16 if bf16 else torch.float32,
            use_distributed_optimizer=False), self.model_chunks)
        gbs, iters = settings.global_batch_size, settings.train_iters
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if settings.lr_warmup_iters else settings.lr, max_lr=settings.lr,
            min_lr=settings.min_lr, lr_warmup_steps=settings.lr_warmup_iters * gbs, lr_decay_steps=iters * gbs,
            lr_decay_style=settings.lr_decay_style, start_wd=settings.weight_decay, end_wd=settings.weight_decay,
            wd_incr_steps=iters * gbs, wd_incr_style="constant")
        self.loads = LoadCapture(self.model_chunks)
        no_sync = [c.no_sync for c in self.model_chunks]  # one per chunk, or the only one, as Megatron-LM sets it
        for chunk in self.model_chunks:  # each chunk has its own config object; the schedules read chunk 0's
            chunk.config.finalize_model_grads_func = self.loads
            chunk.config.no_sync_func = no_sync if len(no_sync) > 1 else no_sync[0]
            chunk.config.grad_scale_func = self.optimizer.scale_loss
        self.mcore_config = self.model_chunks[0].config
        self.iteration, self.consumed_samples, self.checkpoint = 0, 0, None
        if settings.load:
            # Megatron-LM's --finetune / --no-load-optim / --no-load-rng: converted or foreign checkpoints
            # carry weights only, and a fine-tune starts its own schedule from step 0.
            weights_only = args.finetune or args.no_load_optim
            state = load_checkpoint(settings.load, self.model_chunks, None if weights_only else self.optimizer,
                                    None if weights_only else self.scheduler,
                                    load_rng=not (args.finetune or args.no_load_rng))
            if not args.finetune:
                self.iteration = state.get("iteration", 0)
                self.consumed_samples = state.get("consumed_samples", 0)
        self.tracker = self._tracker()

    def _build_chunks(self, model_kwargs: dict) -> list:
        """This rank's model chunks: one for 1F1B, two (a stage and its mirror or V partner) for DualPipe(V)."""
        cfg, seed = self.cfg, self.settings.seed
        # Megatron-LM's --calculate-per-token-loss: off, each micro-batch's loss is its token mean (divided by
        # the micro-batch count); on, token sums, divided by the global token count when gradients are final.
        per_token = bool(getattr(self.args, "calculate_per_token_loss", False))
        model_kwargs = {**model_kwargs, "calculate_per_token_loss": per_token}
        if self.settings.pipeline_schedule in DUAL_SCHEDULES:
            return build_chunks(cfg, self.settings.pipeline_schedule, seed=seed, **model_kwargs)
        model = build_model(cfg, **model_kwargs)
        init_layout_independent(model, seed)
        return [model]

    def _datasets(self):
        """Megatron indexed data for --data-path, else the built-in corpus; data errors name their flag."""
        s = self.settings
        try:
            if self.args.data_path:
                if len(self.args.data_path) != 1:
                    raise ValueError("--data-path: give one .bin/.idx prefix (blends are not supported yet)")
                return data.indexed_datasets(self.args.data_path[0], s.seq_length, s.seed, tokenizer=self.tokenizer)
            return data.builtin_datasets(s.seq_length, tokenizer=self.tokenizer)
        except ValueError as err:
            raise UsageError(str(err)) from None

    def _tracker(self):
        if not self.args.wandb_project:
            return None
        from megatron_dsv3.tracking.wandb_tracker import WandbTracker

        return WandbTracker(self.args.wandb_project, exp_name=self.args.wandb_exp_name,
                            save_dir=self.args.wandb_save_dir, entity=self.args.wandb_entity,
                            config={"dsv3": dataclasses.asdict(self.cfg),
                                    "train": dataclasses.asdict(self.settings)})

    def _iterator(self, dataset, consumed: int):
        return data.SampleIterator(
            dataset, self.settings.micro_batch_size, seed=self.settings.seed,
            dp_rank=parallel_state.get_data_parallel_rank(), dp_size=parallel_state.get_data_parallel_world_size(),
            consumed_samples=consumed)

    def _gather_moe(self) -> Optional[tuple]:
        """Expert loads and biases of every pipeline stage, on every rank of the pipeline group."""
        local = (self.loads.loads, self.loads.biases)
        if parallel_state.get_pipeline_model_parallel_world_size() == 1:
            parts = [local]
        else:
            parts = [None] * parallel_state.get_pipeline_model_parallel_world_size()
            torch.distributed.all_gather_object(parts, local, group=parallel_state.get_pipeline_model_parallel_group())
        loads = {k: v for part in parts for k, v in part[0].items()}
        biases = {k: v for part in parts for k, v in part[1].items()}
        if not loads:
            return None
        names = sorted(loads, key=lambda n: (n.startswith("mtp"), n))
        return torch.stack([loads[n] for n in names]), torch.stack([biases[n] for n in names]), names

    def _save(self):
        self.checkpoint = save_checkpoint(
            self.settings.save, self.iteration, self.model_chunks, self.optimizer, self.scheduler,
            {"iteration": self.iteration, "consumed_samples": self.consumed_samples})

    def train(self) -> dict:
        s = self.settings
        train_iter = self._iterator(self.train_data, self.consumed_samples)
        losses, rates, valid_loss = [], [], None
        bar = tqdm(total=s.train_iters, initial=self.iteration, disable=self.rank != 0 or not self.args.progress,
                   desc="dsv3-pretrain", mininterval=1.0, dynamic_ncols=True)
        while self.iteration < s.train_iters:
            start = time.perf_counter()
            metrics = train_step(self.model_chunks, self.optimizer, self.scheduler, train_iter,
                                 num_microbatches=s.num_microbatches, seq_length=s.seq_length,
                                 micro_batch_size=s.micro_batch_size, global_batch_size=s.global_batch_size,
                                 forward_backward_func=self.forward_backward)
            self.iteration += 1
            self.consumed_samples += s.global_batch_size
            metrics.update(moe_and_mtp_metrics(self.mcore_config, s.num_microbatches, self.iteration))
            metrics["tokens_per_s"] = s.global_batch_size * s.seq_length / (time.perf_counter() - start)
            losses.append(metrics["lm_loss"])
            rates.append(metrics["tokens_per_s"])
            moe = self._gather_moe() if self.tracker is not None else None
            if self.tracker is not None:
                self.tracker.log({f"train/{k}": v for k, v in metrics.items()}, step=self.iteration)
                if moe is not None:
                    self.tracker.log_moe(*moe, step=self.iteration)
            bar.set_postfix(loss=f"{metrics['lm_loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}", refresh=False)
            bar.update(1)
            if s.eval_interval and (self.iteration % s.eval_interval == 0 or self.iteration == s.train_iters):
                valid_loss = evaluate(self.model_chunks, self._iterator(self.valid_data, 0), iters=s.eval_iters,
                                      num_microbatches=s.num_microbatches, seq_length=s.seq_length,
                                      micro_batch_size=s.micro_batch_size,
                                      forward_backward_func=self.forward_backward)
                if self.tracker is not None:
                    self.tracker.log({"valid/lm_loss": valid_loss}, step=self.iteration)
            if s.save and s.save_interval and self.iteration % s.save_interval == 0:
                self._save()
            if s.exit_interval and self.iteration % s.exit_interval == 0:
                break  # Megatron-LM's --exit-interval: stop here (the checkpoint below is still written)
        bar.close()
        if s.save and (self.checkpoint is None or not self.checkpoint.endswith(f"{self.iteration:07d}")):
            self._save()
        steady = rates[1:] or rates
        return {
            "steps": self.iteration, "first_lm_loss": losses[0] if losses else None,
            "final_lm_loss": losses[-1] if losses else None, "valid_lm_loss": valid_loss,
            "tokens_per_s": sum(steady) / len(steady) if steady else None, "lm_losses": losses,
            "checkpoint": self.checkpoint, "wandb_dir": self.tracker.run_dir if self.tracker else None,
        }

    def close(self):
        if getattr(self, "tracker", None) is not None:
            self.tracker.finish()
        runtime.shutdown()
