"""The model's linears, MLPs and MoE layers as plain tensor arithmetic for decoding (TP=1, EP=1).

Training's MoE layer runs every local expert behind the all-to-all dispatcher whatever the batch; a decode
step holds a handful of tokens, so here each token is routed with the layer's own gate and only the experts
that received tokens run, each once over all of its tokens. Linears read the modules' weights directly:
megatron-core's tensor-parallel autograd wrappers do nothing at TP=1 but cost time on every call.
Anything without a plain form here (FP8 linears, token dropping, other activations) runs its own module.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from megatron.core.transformer.moe import moe_utils
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.moe.moe_layer import MoELayer

from megatron_dsv3.model.norm import LatentRMSNorm, RMSNorm
from megatron_dsv3.moe.grouped_experts import grouped_linear
from megatron_dsv3.moe.router import DeepSeekRouter

Step = Callable[[torch.Tensor], torch.Tensor]

# Up to this many bytes of expert weights, the (token, expert) pairs copy their experts' weights and run two
# batched matmuls; beyond it the copy (~12 GB/s) costs more than the grouped GEMM's fixed ~100 us. Measured on
# 2 CPU cores: gathering wins up to ~50 pairs of 24 KB experts (the tiny preset) and 4 pairs of 290 KB ones
# (the small preset, 88 vs 148 us), and ties at 4 pairs of 390 KB ones (the speed benchmark's shape).
GATHER_BYTES = 1280 * 1024


def module_output(result):
    """Megatron modules return (output, bias) or (output, None); fold the bias in when there is one."""
    if isinstance(result, tuple):
        out, bias = result[0], result[1] if len(result) > 1 else None
        return out if bias is None else out + bias
    return result


def _calls(module) -> Step:
    return lambda x: module_output(module(x))


def plain_linear(module) -> Step:
    """x -> x W^T (+ b): one F.linear for a local megatron-core linear at TP=1, else the module itself."""
    tp = getattr(getattr(module, "config", None), "tensor_model_parallel_size", 1)
    if type(module) not in (ColumnParallelLinear, RowParallelLinear) or tp != 1 or module.weight is None:
        return _calls(module)
    bias = module.bias if getattr(module, "bias", None) is not None and module.bias.numel() else None
    return partial(F.linear, weight=module.weight, bias=bias)


def plain_norm(norm) -> Step:
    """x -> F.rms_norm(x) with the module's weight and eps for this package's RMSNorm (what its forward calls
    when no graph is recorded), skipping the module call; any other norm runs itself."""
    if type(norm) not in (RMSNorm, LatentRMSNorm):
        return norm
    return partial(F.rms_norm, normalized_shape=(norm.weight.shape[0],), weight=norm.weight, eps=norm.eps)


def plain_norm_pair(first, second) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """(a, b) -> cat([first(a), second(b)], -1), the MTP module's two input norms. Two of this package's
    RMSNorms of one width and eps run as one F.rms_norm over both halves times both weights (the same bits,
    one norm call fewer per draft); their weights become rows of one [2, width] tensor, as the experts' do."""
    if type(first) in (RMSNorm, LatentRMSNorm) and type(second) is type(first) and first.eps == second.eps \
            and first.weight.shape == second.weight.shape:
        weights = _stacked([first.weight, second.weight])
        if weights is not None:
            width, eps = first.weight.shape[0], first.eps

            def pair(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
                both = torch.cat([a, b], dim=-1).view(*a.shape[:-1], 2, width)
                return (F.rms_norm(both, (width,), None, eps) * weights).view(*a.shape[:-1], 2 * width)
            return pair
    first, second = plain_norm(first), plain_norm(second)
    return lambda a, b: torch.cat([first(a), second(b)], dim=-1)


def plain_embedding(embedding) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """(ids [b, s], first position) -> [s, b, hidden]: one F.embedding for megatron-core's LanguageModelEmbedding
    at TP=1 in eval mode without position or token-type embeddings (DeepSeek-V3's), else the module itself."""
    words = embedding.word_embeddings
    cfg = embedding.config
    plain = (type(embedding) is LanguageModelEmbedding and type(words) is VocabParallelEmbedding
             and not embedding.add_position_embedding and embedding.tokentype_embeddings is None
             and not embedding.reduce_scatter_embeddings and not cfg.sequence_parallel
             and not (getattr(cfg, "use_mup", False) and getattr(cfg, "mup_embedding_mult", 1.0) != 1.0)
             and words.tp_group.size() == 1 and getattr(words, "gtp_remat_size", 1) <= 1)
    if not plain:
        def step(ids: torch.Tensor, start: int) -> torch.Tensor:
            pos = torch.arange(start, start + ids.shape[1], device=ids.device).unsqueeze(0).expand_as(ids)
            return embedding(input_ids=ids, position_ids=pos)
        return step
    fp32 = cfg.fp32_residual_connection

    def step(ids: torch.Tensor, start: int) -> torch.Tensor:
        h = F.embedding(ids, words.weight).transpose(0, 1).contiguous()
        return h.float() if fp32 else h
    return step


def plain_router_logits(router) -> Step:
    """Router logits in the router's dtype as megatron-core's gating computes them (one mm, no autograd
    Function), where Transformer Engine's GEMM and a router bias are absent; else the router's own gating."""
    if moe_utils.te_general_gemm is not None or getattr(router, "bias", None) is not None:
        return router.gating
    dtype = {"fp32": torch.float32, "fp64": torch.float64}.get(router.config.moe_router_dtype)
    weight = router.weight
    return lambda x: torch.mm(x.to(dtype or x.dtype), weight.to(dtype or x.dtype).t())


def _is_swiglu(mlp) -> bool:
    return mlp.config.gated_linear_unit and mlp.config.activation_func is F.silu


def _swiglu(x: torch.Tensor) -> torch.Tensor:
    gate, up = torch.chunk(x, 2, dim=-1)
    return F.silu(gate) * up


def plain_mlp(mlp) -> Step:
    """A dense SwiGLU MLP (the first-k dense layers, the shared experts) as two plain linears."""
    if type(mlp) is MLP or (type(mlp).__name__ == "SharedExpertMLP" and not mlp.use_shared_expert_gate):
        if _is_swiglu(mlp):
            fc1, fc2 = plain_linear(mlp.linear_fc1), plain_linear(mlp.linear_fc2)
            return lambda x: fc2(_swiglu(fc1(x)))
    return _calls(mlp)


@torch.no_grad()
def _stacked(weights: list[torch.Tensor]) -> Optional[torch.Tensor]:
    """One [E, ...] tensor holding every expert's weight, so a few tokens gather their experts' weights in
    one index; None where the weights cannot share one without a copy that training would leave stale.

    Weights that already lie consecutively in one storage (an earlier engine's stack) are viewed as is. Weights
    that each own their storage move into a new stack and become views of it (same values, no second copy).
    Weights inside a larger buffer (megatron-core DDP's) stay where they are."""
    first, size = weights[0], weights[0].numel()
    if all(w.is_contiguous() and w.shape == first.shape and w.untyped_storage().data_ptr() ==
           first.untyped_storage().data_ptr() and w.storage_offset() == first.storage_offset() + i * size
           for i, w in enumerate(weights)):
        return first.new_empty(0).set_(first.untyped_storage(), first.storage_offset(), (len(weights), *first.shape))
    if any(w.untyped_storage().nbytes() != w.numel() * w.element_size() for w in weights):
        return None
    stacked = torch.stack(weights)
    for i, w in enumerate(weights):
        w.data = stacked[i]
    return stacked


class RoutedExperts:
    """One MoE layer for a few tokens: the layer's gate and DeepSeek selection, then each chosen expert's
    SwiGLU once over all tokens routed to it, weighted by its gate and summed with the shared experts."""

    def __init__(self, moe: MoELayer):
        self.moe, self.router = moe, moe.router
        self.router_logits = plain_router_logits(moe.router)
        experts = moe.experts.local_experts
        self.weights = [(e.linear_fc1.weight, e.linear_fc2.weight) for e in experts]
        self.fc1 = _stacked([w for w, _ in self.weights])    # [E, 2 * ffn, hidden]
        self.fc2 = _stacked([w for _, w in self.weights])    # [E, hidden, ffn]
        if self.fc1 is None or self.fc2 is None:
            self.fc1 = self.fc2 = None
        else:
            self.expert_bytes = (self.fc1[0].numel() + self.fc2[0].numel()) * self.fc1.element_size()
        self.shared = plain_mlp(moe.shared_experts) if moe.shared_experts is not None else None

    @staticmethod
    def applies_to(mlp) -> bool:
        cfg = mlp.config
        return (isinstance(mlp, MoELayer) and isinstance(mlp.router, DeepSeekRouter)
                and getattr(mlp.experts, "local_experts", None) is not None and _is_swiglu(mlp.experts)
                and cfg.moe_expert_capacity_factor is None and not cfg.moe_apply_probs_on_input
                and mlp.experts.num_local_experts == cfg.num_moe_experts
                and all(type(e.linear_fc1) is ColumnParallelLinear for e in mlp.experts.local_experts))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        gates, chosen = self.router.select(self.router_logits(flat))
        gates = gates.to(flat.dtype)
        if self.fc1 is None:
            return self._expert_by_expert(flat, gates, chosen).view(shape)
        if chosen.numel() * self.expert_bytes <= GATHER_BYTES:  # few pairs: gather their weights, two bmm
            x = flat.unsqueeze(1).expand(-1, chosen.shape[1], -1).reshape(-1, 1, flat.shape[-1])
            pairs = chosen.reshape(-1)
            hidden = _swiglu(torch.bmm(x, self.fc1.index_select(0, pairs).transpose(1, 2)))
            hidden = hidden * gates.reshape(-1, 1, 1)
            out = torch.bmm(hidden, self.fc2.index_select(0, pairs).transpose(1, 2)).view(*chosen.shape, -1).sum(1)
            return (out if self.shared is None else out + self.shared(flat)).view(shape)
        order, token_of, counts = self._by_expert(chosen)           # more: one grouped GEMM per projection
        offsets = counts.cumsum(0).to(torch.int32)
        hidden = _swiglu(grouped_linear(flat[token_of], self.fc1, offsets)) * gates.reshape(-1)[order].unsqueeze(-1)
        out = torch.zeros_like(flat).index_add_(0, token_of, grouped_linear(hidden, self.fc2, offsets))
        if self.shared is not None:
            out = out + self.shared(flat)
        return out.view(shape)

    def _by_expert(self, chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The (token, expert) pairs sorted by expert: their flat indices, their tokens, pairs per expert."""
        pairs = chosen.reshape(-1)
        order = torch.argsort(pairs, stable=True)
        return order, order // chosen.shape[1], torch.bincount(pairs, minlength=len(self.weights))

    def _expert_by_expert(self, flat: torch.Tensor, gates: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """Each chosen expert once over all of its tokens, reading its own weights (no stacked tensor)."""
        order, token_of, counts = self._by_expert(chosen)
        out = torch.zeros_like(flat)
        start = 0
        for expert, count in enumerate(counts.tolist()):
            if count:
                rows, (fc1, fc2) = slice(start, start + count), self.weights[expert]
                hidden = _swiglu(F.linear(flat[token_of[rows]], fc1)) * gates.reshape(-1)[order[rows]].unsqueeze(-1)
                out.index_add_(0, token_of[rows], F.linear(hidden, fc2))
                start += count
        return out if self.shared is None else out + self.shared(flat)


def plain_feed_forward(mlp) -> Step:
    """A decoder layer's MLP slot: routed experts, dense MLP, or the module itself."""
    if RoutedExperts.applies_to(mlp):
        return RoutedExperts(mlp)
    return plain_mlp(mlp)
