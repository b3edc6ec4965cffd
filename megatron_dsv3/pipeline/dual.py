"""DualPipe and DualPipeV behind megatron-core's forward_backward interface.

`get_forward_backward_func(schedule)` returns a function with the keyword signature of megatron-core's
schedules; `model` is this rank's two chunks from `placement.build_chunks`. Losses and the MoE/MTP loss
scalers go through megatron-core's own `forward_step_calc_loss` and `backward_step`.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from functools import partial, reduce

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel.schedules import (backward_step, deallocate_output_tensor,
                                                       forward_step_calc_loss)
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper
from megatron.core.utils import get_attr_wrapped_model, get_model_config, unwrap_model

from megatron_dsv3 import runtime
from megatron_dsv3.pipeline.executor import Executor
from megatron_dsv3.pipeline.placement import (StageGroup, chunks_communicate_apart, mirror_partner, mirror_state,
                                              keep_float16_between_stages, tie_embedding_grads)
from megatron_dsv3.pipeline.schedule import build
from megatron_dsv3.pipeline.wgrad import deferred_weight_grads, run_all


DUAL_SCHEDULES = ("dualpipe", "dualpipev")
SCHEDULES = ("1f1b", *DUAL_SCHEDULES)


class ModelWork:
    """Stage work on megatron-core model chunks: forward with the micro-batch's data, backward via autograd.

    With `overlap`, an F&B pair runs its forward on a helper thread while this thread runs the backward. The
    two chunks talk on separate communicators (`placement.build_chunks`), so while one half waits in a
    dispatch or combine all-to-all (gloo and NCCL release the GIL there) the other half computes its
    attention or experts: the layer's own attention -> dispatch -> MLP -> combine order gives the split."""

    def __init__(self, chunks, batches, forward_step_func, config, num_microbatches, forward_only,
                 overlap: bool = False):
        self.chunks, self.batches, self.forward_step_func = chunks, batches, forward_step_func
        self.config, self.num_microbatches, self.forward_only = config, num_microbatches, forward_only
        self.overlap = overlap and not forward_only and chunks_communicate_apart(chunks)
        self._helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dualpipe-forward") \
            if self.overlap else None
        self.saved: dict[tuple[int, int], tuple] = {}
        self.losses: dict[int, dict] = {}
        self.num_tokens = torch.zeros([], dtype=torch.int, device=runtime.device())
        self.is_loss_stage = [unwrap_model(c).post_process for c in chunks]
        self.pending_weight_grads: dict[tuple[int, int], list] = {}

    def forward(self, chunk, mb, stage, inputs):
        model = self.chunks[chunk]
        if inputs is not None:
            inputs = inputs.detach().requires_grad_(not self.forward_only)
        get_attr_wrapped_model(model, "set_input_tensor")(inputs)
        context = torch.no_grad() if self.forward_only else torch.enable_grad()
        with context:
            output, loss_func = self.forward_step_func(iter([self.batches[mb]]), model)
            if self.is_loss_stage[chunk]:
                store: list = []
                output, num_tokens = forward_step_calc_loss(
                    model, output, loss_func, self.config, None, False, self.num_microbatches, store,
                    cp_group_size=1, is_last_stage=True)
                self.losses[mb] = store[0]
                self.num_tokens += num_tokens
        if not self.forward_only:
            self.saved[(chunk, mb)] = (inputs, output)
        return output

    def backward(self, chunk, mb, stage, grad, split):
        if self.forward_only:
            return None
        inputs, output = self.saved.pop((chunk, mb))
        if not split:
            return backward_step(inputs, output, grad, self.config)
        with deferred_weight_grads() as pending:  # B now, the linears' weight gradients at this W op
            grad_in = backward_step(inputs, output, grad, self.config)
        self.pending_weight_grads[(chunk, mb)] = pending
        return grad_in

    def sent(self, chunk, mb):
        """megatron-core's output deallocation: once sent, only the output's grad_fn is needed for backward."""
        if (chunk, mb) in self.saved:
            deallocate_output_tensor(self.saved[(chunk, mb)][1], self.config.deallocate_pipeline_outputs)

    def pair(self, forward_args, backward_args):
        """An F&B pair of two different chunks: forward on the helper thread, backward here."""
        if not self.overlap or forward_args[0] == backward_args[0]:
            return self.forward(*forward_args), self.backward(*backward_args)
        pending = self._helper.submit(self.forward, *forward_args)
        try:
            grad = self.backward(*backward_args)
        finally:
            out = pending.result()
        return out, grad

    def close(self) -> None:
        if self._helper is not None:
            self._helper.shutdown()

    def weight(self, chunk, mb, stage):
        """The W op: the weight gradients a split backward deferred (`pipeline.wgrad`)."""
        run_all(self.pending_weight_grads.pop((chunk, mb), []))


def _set_aux_loss_scales(config, num_microbatches: int) -> None:
    """Scale the MoE balance and MTP losses' gradients on every rank, as megatron-core's schedules do.

    megatron-core sets these class-wide scales inside forward_step_calc_loss, which only loss stages run;
    in DualPipe(V) some ranks hold no loss stage, yet their MoE layers backpropagate aux losses too.
    """
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
    from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler

    scale = config.grad_scale_func(torch.ones(1)) if config.grad_scale_func is not None else torch.ones(1)
    if not config.calculate_per_token_loss:
        scale = scale / num_microbatches
    if config.num_moe_experts:
        MoEAuxLossAutoScaler.set_loss_scale(scale)
    if config.mtp_num_layers:
        MTPLossAutoScaler.set_loss_scale(scale)


def _sum_mirror_state(chunks, partner: int) -> None:
    """Add the partner's gradients and router token counts of the mirror stages: my chunk 0 is the mirror of
    its chunk 1 and the other way round, so both copies of a stage end the step with the same totals."""
    group = parallel_state.get_pipeline_model_parallel_group()
    peer = dist.get_global_rank(group, partner)
    mine = [mirror_state(chunks[0]), mirror_state(chunks[1])]
    dtype = reduce(torch.promote_types, (t.dtype for ts in mine for t in ts))  # FP32 grads travel as FP32
    flat = [torch.cat([t.reshape(-1).to(dtype) for t in ts]) for ts in mine]
    mirror_of = [torch.empty_like(flat[0]), torch.empty_like(flat[1])]
    ops = [dist.P2POp(dist.isend, flat[0], peer, tag=1), dist.P2POp(dist.isend, flat[1], peer, tag=2),
           dist.P2POp(dist.irecv, mirror_of[1], peer, tag=1), dist.P2POp(dist.irecv, mirror_of[0], peer, tag=2)]
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    with torch.no_grad():
        for tensors, extra in zip(mine, mirror_of):
            offset = 0
            for t in tensors:
                t.add_(extra[offset:offset + t.numel()].view_as(t).to(t.dtype))
                offset += t.numel()


def _as_list(hook) -> list:
    """megatron-core's sync hooks: None, one callable, or (Megatron-LM with several chunks) one per chunk."""
    return [] if hook is None else hook if isinstance(hook, list) else [hook]


@contextmanager
def _no_sync(no_sync_func):
    """`no_sync_func` (each of them, when a list) held while the schedule runs."""
    with ExitStack() as stack:
        for func in _as_list(no_sync_func):
            stack.enter_context(func())
        yield


def _grad_sync(grad_sync_func, chunks) -> None:
    """`grad_sync_func`: start each chunk's data-parallel gradient reduction, here once the mirror and
    tied-embedding sums have made the gradients final."""
    funcs = _as_list(grad_sync_func)
    for func, chunk in zip(funcs * len(chunks) if len(funcs) == 1 else funcs, chunks):
        func(chunk.parameters())


def _losses_on_last_rank(losses: dict[int, dict]) -> list[dict]:
    """Every micro-batch's loss report, in order, on the last pipeline rank (an empty list elsewhere), which is
    where megatron-core's schedules leave them and where Megatron-LM's logging reads them."""
    group = parallel_state.get_pipeline_model_parallel_group()
    last = dist.get_global_rank(group, group.size() - 1)
    parts = [None] * group.size() if dist.get_rank() == last else None
    dist.gather_object(losses, parts, dst=last, group=group)
    if parts is None:
        return []
    merged = {mb: report for part in parts for mb, report in part.items()}
    return [merged[mb] for mb in sorted(merged)]


def _mtp_metrics_on_last_rank(config) -> None:
    """The MTP losses (and acceptance counts) each rank's MTP stages logged, summed onto the last pipeline
    rank, where megatron-core's schedules leave them and Megatron-LM's logging reads them (zero elsewhere)."""
    if not config.mtp_num_layers:
        return
    group = parallel_state.get_pipeline_model_parallel_group()
    last = dist.get_global_rank(group, group.size() - 1)
    tracker = MTPLossLoggingHelper.tracker
    for key in ("loss_values", "correct_values", "total_values"):
        values = tracker.get(key)
        values = torch.zeros(config.mtp_num_layers, device=runtime.device()) if values is None else values
        dist.reduce(values, dst=last, group=group)
        tracker[key] = values if dist.get_rank() == last else values.zero_()
    if dist.get_rank() == last:  # megatron-core averages them over data-parallel ranks when it logs
        tracker["avg_group"] = parallel_state.get_data_parallel_group(with_context_parallel=True)


def _finalize_groups() -> ProcessGroupCollection:
    """megatron-core's groups, with embedding groups of one rank: the dual placement ties embeddings locally."""
    pg = ProcessGroupCollection.use_mpu_process_groups()
    pg.embd = pg.pos_embd = StageGroup(0, 1)
    return pg


def _pipeline_total_tokens(num_tokens: torch.Tensor) -> torch.Tensor:
    """Loss tokens summed over the loss stages of this pipeline (DualPipe has two, on different ranks), so
    megatron-core's broadcast from the last stage hands every rank the same divisor."""
    total = num_tokens.clone()
    dist.all_reduce(total, group=parallel_state.get_pipeline_model_parallel_group())
    return total


def forward_backward_dual(*, forward_step_func, data_iterator, model, num_microbatches, seq_length,
                          micro_batch_size, decoder_seq_length=None, forward_only=False,
                          collect_non_loss_data=False, first_val_step=None, schedule="dualpipe", overlap=True,
                          **_):
    """megatron-core-style forward/backward over `num_microbatches` with DualPipe or DualPipeV; `overlap`
    runs each F&B pair's halves concurrently when the chunks communicate apart (see `ModelWork`).

    Returns every micro-batch's loss report on the last pipeline rank and [] elsewhere, as megatron-core does.
    """
    if collect_non_loss_data:
        raise ValueError("collect_non_loss_data: not supported by the DualPipe schedules")
    chunks = model if isinstance(model, list) else [model]
    if len(chunks) != 2:
        raise ValueError(f"model: DualPipe schedules need this rank's two chunks, got {len(chunks)}")
    keep_float16_between_stages(chunks)
    config = get_model_config(chunks[0])
    rank = parallel_state.get_pipeline_model_parallel_rank()
    ranks = parallel_state.get_pipeline_model_parallel_world_size()
    plan = build(schedule, ranks, num_microbatches)
    # Ranks that hold neither end of a path get no data in Megatron-LM (data_iterator None): None batches.
    batches = [next(data_iterator) if data_iterator is not None else None for _ in range(num_microbatches)]
    group = parallel_state.get_pipeline_model_parallel_group()
    tp = parallel_state.get_tensor_model_parallel_world_size() if config.sequence_parallel else 1
    shape = (seq_length // tp, micro_batch_size, config.hidden_size)  # activations between stages: [s, b, h]
    work = ModelWork(chunks, batches, forward_step_func, config, num_microbatches, forward_only, overlap=overlap)
    executor = Executor(plan, rank, work, ranks=[dist.get_global_rank(group, r) for r in range(ranks)],
                        shape=shape, dtype=config.pipeline_dtype or torch.float32, group=group,
                        forward_only=forward_only)
    _set_aux_loss_scales(config, num_microbatches)
    with _no_sync(config.no_sync_func if not forward_only else None):
        try:
            executor.run()
        finally:
            work.close()
    if not forward_only:
        partner = mirror_partner(schedule)
        if partner is not None:
            _sum_mirror_state(chunks, partner)
        tie_embedding_grads(chunks)
        _grad_sync(config.grad_sync_func, chunks)
        if config.finalize_model_grads_func is not None:
            num_tokens = _pipeline_total_tokens(work.num_tokens) if config.calculate_per_token_loss else None
            config.finalize_model_grads_func(chunks, num_tokens, pg_collection=_finalize_groups())
    _mtp_metrics_on_last_rank(config)
    return _losses_on_last_rank(work.losses)


def get_forward_backward_func(schedule: str):
    """The forward/backward function for `--pipeline-schedule`: megatron-core's for 1f1b, ours for DualPipe(V)."""
    if schedule == "1f1b":
        from megatron.core.pipeline_parallel import get_forward_backward_func as mcore

        return mcore()
    if schedule in DUAL_SCHEDULES:
        return partial(forward_backward_dual, schedule=schedule)
    raise ValueError(f"--pipeline-schedule: expected one of {', '.join(SCHEDULES)}, got {schedule!r}")
