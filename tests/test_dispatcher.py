"""The all-to-all dispatcher that skips the identity chunk sort on one rank, against megatron-core's own."""
import pytest
import torch
from megatron.core.transformer.moe import token_dispatcher
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

import megatron_dsv3 as m
from megatron_dsv3.moe.dispatcher import AlltoAllDispatcherSkippingIdentitySort


def _moe_step(layer, x):
    """Forward + backward of one MoE layer; returns the output, the input grad and every parameter grad."""
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out, _ = layer(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return [out.detach(), x.grad] + [p.grad.clone() for p in layer.parameters()]


@pytest.mark.parametrize("grouped", [False, True], ids=["sequential-mlp", "grouped-gemm"])
def test_moe_layer_is_bitwise_megatron_core_alltoall_without_the_sort(runtime, monkeypatch, grouped):
    cfg = m.presets.get_preset("tiny").replace(num_nextn_predict_layers=0)
    model = m.build_model(cfg, backend="local", moe_grouped_gemm=grouped)
    layer = model.decoder.layers[cfg.first_k_dense_replace].mlp
    assert type(layer.token_dispatcher) is AlltoAllDispatcherSkippingIdentitySort
    x = torch.randn(16, 3, cfg.hidden_size)  # [sequence, batch, hidden]

    calls = []
    sort = token_dispatcher.sort_chunks_by_idxs
    monkeypatch.setattr(token_dispatcher, "sort_chunks_by_idxs", lambda *a, **k: calls.append(1) or sort(*a, **k))
    ours = _moe_step(layer, x)
    assert calls == []

    layer.token_dispatcher = MoEAlltoAllTokenDispatcher(
        layer.num_local_experts, layer.local_expert_indices, config=layer.config,
        pg_collection=get_default_pg_collection())
    stock = _moe_step(layer, x)
    assert len(calls) == 2  # megatron-core sorts after dispatch and before combine
    assert len(ours) == len(stock) > 2
    for a, b in zip(ours, stock):
        assert torch.equal(a, b)
