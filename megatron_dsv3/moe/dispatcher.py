"""megatron-core's all-to-all token dispatcher without the chunk sort that is the identity on one EP x TP rank.

After the all-to-all, megatron-core re-orders the received chunks from (source rank, local expert) to
(local expert, source rank) order and back before the combine. With one source rank (EP x TP = 1: a single
GPU, or a data-parallel-only run) both orders are the same, yet it still splits and concatenates every
routed token's hidden state, forward and backward. Skipping that copy changes no bit.
"""
from __future__ import annotations

from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher


class AlltoAllDispatcherSkippingIdentitySort(MoEAlltoAllTokenDispatcher):
    """The all-to-all dispatcher, minus the local-expert sort when only one rank sends tokens."""

    def _chunk_order_is_identity(self) -> bool:
        return self.ep_size * self.tp_size == 1 and not self.drop_and_pad

    def dispatch_postprocess(self, global_input_tokens, global_probs):
        if not self._chunk_order_is_identity():
            return super().dispatch_postprocess(global_input_tokens, global_probs)
        tokens_per_expert = self._maybe_dtoh_and_synchronize("before_permutation_2", self.tokens_per_expert)
        tokens_per_expert = self._maybe_dtoh_and_synchronize("before_finish", tokens_per_expert)
        self.tokens_per_expert = None
        return global_input_tokens, tokens_per_expert, global_probs

    def combine_preprocess(self, hidden_states):
        if not self._chunk_order_is_identity():
            return super().combine_preprocess(hidden_states)
        return hidden_states


class DSV3MoELayer(MoELayer):
    """megatron-core's MoE layer; with `--moe-token-dispatcher-type alltoall`, the dispatcher above."""

    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None, **kwargs):
        pg_collection = pg_collection if pg_collection is not None else get_default_pg_collection()
        super().__init__(config, submodules=submodules, layer_number=layer_number, pg_collection=pg_collection,
                         **kwargs)
        if type(self.token_dispatcher) is MoEAlltoAllTokenDispatcher:
            self.token_dispatcher = AlltoAllDispatcherSkippingIdentitySort(
                self.num_local_experts, self.local_expert_indices, config=self.config,
                pg_collection=pg_collection)
            if getattr(self, "_training_token_dispatcher", None) is not None:  # inference_optimized keeps both
                self._training_token_dispatcher = self.token_dispatcher
            if self.use_shared_expert and self.shared_expert_overlap:
                self.token_dispatcher.set_shared_experts(self.shared_experts)
