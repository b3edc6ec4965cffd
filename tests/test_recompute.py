"""Selective recompute and the local grouped experts change no number: losses and gradients bit for bit."""
import pytest
import torch

import megatron_dsv3 as m
from megatron_dsv3.model.init import init_layout_independent
from megatron_dsv3.moe.grouped_experts import GroupedMLP


def _step(**mcore):
    """Loss and gradients of one tiny-model step (MoE layers, MTP) from a fixed model and batch."""
    cfg = m.presets.get_preset("tiny")
    model = m.build_model(cfg, backend="local", **mcore)
    init_layout_independent(model, 3)
    ids = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    loss = model(ids, torch.arange(32).expand(2, 32), None, labels=torch.roll(ids, -1, 1))
    loss.mean().backward()
    return model, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def plain(runtime):
    return _step()


def _assert_same(plain, other):
    _, loss, grads = plain
    _, other_loss, other_grads = other
    assert torch.equal(loss, other_loss)
    assert grads.keys() == other_grads.keys()
    assert [n for n in grads if not torch.equal(grads[n], other_grads[n])] == []


def test_grouped_experts_equal_one_gemm_per_expert(plain):
    grouped = _step(moe_grouped_gemm=True)
    assert any(isinstance(module, GroupedMLP) for module in grouped[0].modules())
    _assert_same(plain, grouped)


@pytest.mark.parametrize("modules", [["layernorm"], ["mla_up_proj"], ["moe_act"],
                                     ["layernorm", "mla_up_proj", "moe_act"]], ids="+".join)
def test_selective_recompute_is_bitwise(plain, modules):
    recomputed = _step(moe_grouped_gemm=True, recompute_granularity="selective", recompute_modules=modules)
    _assert_same(plain, recomputed)


def test_recompute_discards_what_it_recomputes(runtime):
    """The recomputed activations are really dropped after the forward (their storage is freed): at least the
    two norm outputs of every decoder and MTP layer, [tokens, hidden] FP32 each."""
    from benchmarks.recompute_memory import saved_activation_bytes

    cfg = m.presets.get_preset("tiny")
    sizes = {}
    for name, mcore in {"none": {}, "selective": dict(recompute_granularity="selective",
                                                       recompute_modules=["layernorm", "mla_up_proj", "moe_act"])}.items():
        model = m.build_model(cfg, backend="local", moe_grouped_gemm=True, **mcore)
        ids = torch.randint(0, cfg.vocab_size, (2, 64))
        sizes[name] = saved_activation_bytes(model, ids)
    norm_outputs = 2 * (cfg.num_hidden_layers + cfg.num_nextn_predict_layers) * ids.numel() * cfg.hidden_size * 4
    assert sizes["none"] - sizes["selective"] >= norm_outputs
