"""The training run behind `dsv3-pretrain`: megatron-core DDP, optimizer, LR schedule, checkpoints, tracking."""
from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.transformer.module import Float16Module
from tqdm import tqdm

from megatron_dsv3 import data, runtime
from megatron_dsv3.checkpoint.dist import check_writable, load_checkpoint, peek_train_state, save_checkpoint
from megatron_dsv3.cli.errors import UsageError
from megatron_dsv3.model.builder import build_model
from megatron_dsv3.model.init import init_layout_independent
from megatron_dsv3.pipeline.dual import DUAL_SCHEDULES, get_forward_backward_func
from megatron_dsv3.pipeline.placement import build_chunks
from megatron_dsv3.training.resume import check_resumed_schedule
from megatron_dsv3.tracking.moe_metrics import maxvio
from megatron_dsv3.training.step import LoadCapture, evaluate, moe_and_mtp_metrics, train_step


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient: the run stops with one line naming the iteration."""


class Trainer:
    """Builds everything once, then `train()` runs the steps; rank 0 logs and reports."""

    def __init__(self, cfg, settings, args, model_kwargs: dict):
        from megatron.training import global_vars
        from megatron.training.training import (get_megatron_ddp_config, get_megatron_optimizer_config,
                                                get_optimizer_param_scheduler)

        self.cfg, self.settings, self.args = cfg, settings, args
        try:
            self.tokenizer = data.make_tokenizer(args.tokenizer_type, args.tokenizer_model)
        except ValueError as err:
            raise UsageError(str(err)) from None
        if self.tokenizer.vocab_size > cfg.vocab_size:
            raise UsageError(f"--vocab-size: the model's vocabulary ({cfg.vocab_size}) is smaller than the "
                             f"tokenizer's ({self.tokenizer.vocab_size})")
        self.train_data, self.valid_data = self._datasets()
        if settings.save and int(os.environ.get("RANK", "0")) == 0:
            check_writable(settings.save)
        runtime.initialize(tp=cfg.tensor_model_parallel_size, pp=cfg.pipeline_model_parallel_size,
                           ep=cfg.expert_model_parallel_size, seed=settings.seed,
                           timeout_minutes=args.distributed_timeout_minutes)
        self.rank = torch.distributed.get_rank()
        global_vars.set_args(args)  # megatron.training's config builders below read the flags from here
        chunks = self._build_chunks(model_kwargs)
        if args.bf16 or args.fp16:  # Megatron-LM's --bf16/--fp16: 16-bit weights and compute, FP32 main weights
            chunks = [Float16Module(chunk.config, chunk) for chunk in chunks]
        ddp_config = get_megatron_ddp_config(args)
        self.model_chunks = [DistributedDataParallel(chunk.config, ddp_config, chunk) for chunk in chunks]
        self.forward_backward = get_forward_backward_func(settings.pipeline_schedule)
        optimizer_config, optimizer_overrides = get_megatron_optimizer_config(args)
        self.optimizer = get_megatron_optimizer(optimizer_config, self.model_chunks,
                                                config_overrides=optimizer_overrides,
                                                use_gloo_process_groups=args.use_gloo_process_groups)
        self.scheduler = get_optimizer_param_scheduler(self.optimizer)
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
            if not weights_only:
                check_resumed_schedule(peek_train_state(settings.load).get("opt_param_scheduler"), self.scheduler,
                                       args, settings.global_batch_size)
            state = load_checkpoint(settings.load, self.model_chunks, None if weights_only else self.optimizer,
                                    None if weights_only else self.scheduler,
                                    load_rng=not (args.finetune or args.no_load_rng), partial=settings.partial_load)
            if not args.finetune:
                self.iteration = state.get("iteration", 0)
                self.consumed_samples = state.get("consumed_samples", 0)
        self.tracker = self._tracker()

    def _build_chunks(self, model_kwargs: dict) -> list:
        """This rank's model chunks: one for 1F1B, two (a stage and its mirror or V partner) for DualPipe(V)."""
        cfg, seed = self.cfg, self.settings.seed
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

    def _checked_step(self, train_iter) -> dict:
        """One training step; with Megatron-LM's --check-for-nan-in-loss-and-grad (the default) a non-finite
        loss or gradient stops the run here, before anything is saved, so the last good checkpoint stays."""
        s, step = self.settings, self.iteration + 1
        try:
            metrics = train_step(self.model_chunks, self.optimizer, self.scheduler, train_iter,
                                 num_microbatches=s.num_microbatches, seq_length=s.seq_length,
                                 micro_batch_size=s.micro_batch_size, global_batch_size=s.global_batch_size,
                                 forward_backward_func=self.forward_backward)
        except RuntimeError as err:  # megatron-core DDP's gradient check (check_for_nan_in_grad)
            found = re.search(r"found (NaN|Inf)[^']*", str(err))
            if found is None:
                raise
            raise TrainingDiverged(self._diverged(step, found.group(0).strip())) from None
        if self.args.check_for_nan_in_loss_and_grad:
            bad = [k for k in ("lm_loss", "grad_norm") if not math.isfinite(metrics[k])]
            if bad:
                raise TrainingDiverged(self._diverged(step, ", ".join(f"{k} = {metrics[k]}" for k in bad)))
        return metrics

    def _diverged(self, step: int, what: str) -> str:
        kept = self.checkpoint or self.settings.load or "none was saved"
        return (f"training diverged at iteration {step}: {what}; stopped without saving (last checkpoint: {kept}); "
                "lower --lr, or pass --no-check-for-nan-in-loss-and-grad to train on")

    def _save(self):
        self.checkpoint = save_checkpoint(
            self.settings.save, self.iteration, self.model_chunks, self.optimizer, self.scheduler,
            {"iteration": self.iteration, "consumed_samples": self.consumed_samples,
             "opt_param_scheduler": self.scheduler.state_dict()})

    def train(self) -> dict:
        s = self.settings
        train_iter = self._iterator(self.train_data, self.consumed_samples)
        losses, rates, lrs, maxvios, valid_loss = [], [], [], [], None
        bar = tqdm(total=s.train_iters, initial=self.iteration, disable=self.rank != 0 or not self.args.progress,
                   desc="dsv3-pretrain", mininterval=1.0, dynamic_ncols=True)
        while self.iteration < s.train_iters:
            start = time.perf_counter()
            metrics = self._checked_step(train_iter)
            self.iteration += 1
            self.consumed_samples += s.global_batch_size
            metrics.update(moe_and_mtp_metrics(self.mcore_config, s.num_microbatches, self.iteration))
            metrics["tokens_per_s"] = s.global_batch_size * s.seq_length / (time.perf_counter() - start)
            losses.append(metrics["lm_loss"])
            lrs.append(metrics["lr"])
            rates.append(metrics["tokens_per_s"])
            moe = self._gather_moe()
            if moe is not None:  # MaxVio_batch: mean over the decoder's MoE layers of max load / mean load - 1
                decoder = [i for i, name in enumerate(moe[2]) if name.startswith("layer_")]
                maxvios.append(float(maxvio(moe[0][decoder]).mean()) if decoder else 0.0)
                metrics["maxvio"] = maxvios[-1]
            if self.tracker is not None:
                self.tracker.log({f"train/{k}": v for k, v in metrics.items()}, step=self.iteration)
                if moe is not None:
                    self.tracker.log_moe(*moe, step=self.iteration)
            bar.set_postfix(loss=f"{metrics['lm_loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}",
                            **({"maxvio": f"{maxvios[-1]:.2f}"} if moe is not None else {}), refresh=False)
            bar.update(1)
            if s.eval_interval and s.eval_iters and (self.iteration % s.eval_interval == 0
                                                     or self.iteration == s.train_iters):
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
            "tokens_per_s": sum(steady) / len(steady) if steady else None, "lm_losses": losses, "lrs": lrs,
            "maxvio_batch": maxvios,
            "checkpoint": self.checkpoint, "wandb_dir": self.tracker.run_dir if self.tracker else None,
        }

    def close(self):
        if getattr(self, "tracker", None) is not None:
            self.tracker.finish()
        runtime.shutdown()
