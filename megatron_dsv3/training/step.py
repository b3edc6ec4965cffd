"""One training or evaluation step on megatron-core's schedules, and the metrics DeepSeek-V3 users watch."""
from __future__ import annotations

from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

from megatron_dsv3 import runtime
from megatron_dsv3.moe.balancing import biased_routers, global_expert_loads


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Token-summed LM loss, its token count and a [sum, count] report (megatron-core's 3-tuple contract)."""
    losses = output_tensor.float()
    loss = torch.sum(losses * loss_mask)
    num_tokens = loss_mask.sum().to(torch.int)
    return loss, num_tokens, {"lm loss": torch.stack([loss.detach(), num_tokens.float()])}


def forward_step(data_iterator, model):
    """megatron-core forward_step: next micro-batch through the GPTModel (MTP loss is attached inside)."""
    device = runtime.device()  # batches come off the CPU data pipeline; the model runs on this rank's GPU
    batch = {k: v.to(device, non_blocking=True) for k, v in next(data_iterator).items()}
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                   loss_mask=batch["loss_mask"])
    return output, partial(loss_func, batch["loss_mask"].float())


def router_names(routers) -> list[str]:
    """Readable names for biased routers (from `biased_routers`): `layer_NN` by global number, `mtp_K`."""
    return [f"mtp_{r.layer_number - 1}" if r.is_mtp_layer else f"layer_{r.layer_number - 1:02d}" for r in routers]


class LoadCapture:
    """finalize_model_grads that records global expert loads just before megatron-core's bias update resets them."""

    def __init__(self, model_chunks):
        self.model_chunks = model_chunks
        self.loads: dict[str, torch.Tensor] = {}
        self.biases: dict[str, torch.Tensor] = {}
        self.routers = biased_routers(model_chunks)  # found once: walking every module each step costs ~1 ms
        self.names = router_names(self.routers)

    def __call__(self, model, num_tokens=None, **kwargs):
        routers, names = self.routers, self.names
        if routers:
            self.loads = dict(zip(names, global_expert_loads(routers)))
        result = finalize_model_grads(model, num_tokens, **kwargs)
        self.biases = {n: r.expert_bias.detach().clone() for n, r in zip(names, routers)}
        return result


def _pipeline_sum(values: dict[str, float], keys: list[str]) -> dict[str, float]:
    """Sum scalars over the pipeline ranks (absent = 0), so every rank, rank 0 included, holds the value of
    whichever stages computed it: the last stage in 1F1B, the first rank or both ends in DualPipe(V)."""
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return values
    buf = torch.tensor([values.get(k, 0.0) for k in keys], dtype=torch.float64)
    torch.distributed.all_reduce(buf, group=parallel_state.get_pipeline_model_parallel_group())
    return dict(zip(keys, buf.tolist()))


def reduce_losses(losses: list[dict]) -> dict[str, float]:
    """Token-weighted mean LM loss over micro-batches and data-parallel ranks (loss stages report, others add 0)."""
    total = torch.zeros(2)
    for d in losses:
        total += d["lm loss"].float()
    torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    total_sum, count = _pipeline_sum({"sum": total[0].item(), "count": total[1].item()}, ["sum", "count"]).values()
    return {"lm_loss": total_sum / count}


def moe_and_mtp_metrics(config, num_microbatches: int, iteration: int) -> dict[str, float]:
    """Sequence-wise balance loss (mean over MoE layers) and MTP loss, reduced over ranks, then cleared."""
    scalars: dict[str, float] = {}
    if config.num_moe_experts:
        total = {}
        get_moe_metrics_tracker().report(
            loss_scale=1.0 / num_microbatches, iteration=iteration, force_initialize=True,
            track_names=["seq_load_balancing_loss"], num_layers=config.num_layers,
            moe_layer_freq=config.moe_layer_freq, mtp_num_layers=config.mtp_num_layers, total_loss_dict=total)
        scalars["seq_balance_loss"] = float(total.get("seq_load_balancing_loss", 0.0))
    if config.mtp_num_layers:
        tracker = MTPLossLoggingHelper.tracker
        if "loss_values" in tracker:
            MTPLossLoggingHelper.reduce_metrics_in_tracker()
            scalars["mtp_loss"] = (tracker["loss_values"].sum() / num_microbatches).item()
            MTPLossLoggingHelper.clean_metrics_in_tracker()
        scalars.update(_pipeline_sum(scalars, ["mtp_loss"]))
    return scalars


def train_step(model_chunks, optimizer, scheduler, data_iterator, *, num_microbatches: int, seq_length: int,
               micro_batch_size: int, global_batch_size: int, forward_backward_func=None) -> dict[str, float]:
    """Forward/backward over the global batch with the pipeline schedule (megatron-core's by default),
    then the optimizer and LR steps."""
    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    losses = (forward_backward_func or get_forward_backward_func())(
        forward_step_func=forward_step, data_iterator=data_iterator, model=model_chunks,
        num_microbatches=num_microbatches, seq_length=seq_length, micro_batch_size=micro_batch_size,
        decoder_seq_length=seq_length, forward_only=False)
    update_ok, grad_norm, _ = optimizer.step()
    if update_ok:
        scheduler.step(increment=global_batch_size)
    metrics = reduce_losses(losses)
    metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
    metrics["lr"] = optimizer.param_groups[0]["lr"]
    return metrics


@torch.no_grad()
def evaluate(model_chunks, data_iterator, *, iters: int, num_microbatches: int, seq_length: int,
             micro_batch_size: int, forward_backward_func=None) -> float:
    """Mean validation LM loss over `iters` global batches."""
    for chunk in model_chunks:
        chunk.eval()
    totals = []
    for _ in range(iters):
        losses = (forward_backward_func or get_forward_backward_func())(
            forward_step_func=forward_step, data_iterator=data_iterator, model=model_chunks,
            num_microbatches=num_microbatches, seq_length=seq_length, micro_batch_size=micro_batch_size,
            decoder_seq_length=seq_length, forward_only=True)
        totals.append(reduce_losses(losses)["lm_loss"])
    for chunk in model_chunks:
        chunk.train()
    get_moe_metrics_tracker().clear()
    MTPLossLoggingHelper.clean_metrics_in_tracker()
    return sum(totals) / len(totals)
