"""One forward/backward/optimizer step of the tiny preset with MTP on CPU."""
import torch
from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker

import megatron_dsv3 as m
from megatron_dsv3.moe.balancing import biased_routers, update_expert_bias


def test_tiny_step_grads_and_expert_bias(runtime):
    cfg = m.presets.get_preset("tiny")
    model = m.build_model(cfg, backend="local")
    ids = torch.randint(0, cfg.vocab_size, (2, 32))
    loss = model(ids, torch.arange(32).expand(2, 32), None, labels=ids)
    assert loss.shape == (2, 32) and torch.isfinite(loss).all()
    loss.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []
    assert model.mtp is not None and any(p.grad.abs().sum() > 0 for p in model.mtp.parameters())

    routers = biased_routers([model])
    assert len(routers) == cfg.num_hidden_layers - cfg.first_k_dense_replace + cfg.num_nextn_predict_layers
    bias_names = {n for n, _ in model.named_buffers() if n.endswith("expert_bias")}
    assert bias_names and not bias_names & {n for n, _ in model.named_parameters()}  # not optimised

    before = [r.expert_bias.clone() for r in routers]
    torch.optim.AdamW(model.parameters(), lr=1e-3).step()
    assert all(torch.equal(b, r.expert_bias) for b, r in zip(before, routers))  # the optimizer leaves it alone
    loads = update_expert_bias([model])
    gamma = cfg.bias_update_speed
    for b, r, load in zip(before, routers, loads):
        expected = b + gamma * torch.sign(load.mean() - load)
        assert torch.equal(r.expert_bias, expected)
        assert set((r.expert_bias - b).abs().unique().tolist()) <= {0.0, torch.tensor(gamma).item()}
        assert r.local_tokens_per_expert.sum() == 0
    assert loads.sum(dim=1).eq(ids.numel() * cfg.num_experts_per_tok).all()


def test_sequence_balance_loss_is_tracked(runtime):
    cfg = m.presets.get_preset("tiny")
    model = m.build_model(cfg, backend="local")
    clear_aux_losses_tracker()
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    model(ids, torch.arange(16).expand(2, 16), None, labels=ids).mean().backward()
    tracker = get_moe_layer_wise_logging_tracker()
    assert "seq_load_balancing_loss" in tracker
    values = tracker["seq_load_balancing_loss"]["values"]
    assert (values[cfg.first_k_dense_replace:cfg.num_hidden_layers] > 0).all()


def test_cpu_fused_weight_gradient_accumulation_is_fp32_exact():
    """The CPU stand-in for megatron-core's fused_weight_gradient_mlp_cuda: main_grad += dY^T X with BF16
    operands multiplied and summed in FP32 (not rounded to BF16 first)."""
    from megatron.core.tensor_parallel import layers

    m.compat.apply_cpu_patches()
    kernel = layers.fused_weight_gradient_mlp_cuda
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 48, generator=g).bfloat16()
    dy = torch.randn(64, 32, generator=g).bfloat16()
    main_grad = torch.randn(32, 48, generator=g)
    expected = main_grad.double() + dy.double().t() @ x.double()
    kernel.wgrad_gemm_accum_fp32(x, dy, main_grad)
    assert (main_grad.double() - expected).abs().max() < 1e-5
    exact = dy.double().t() @ x.double()
    assert ((dy.t() @ x).double() - exact).abs().max() > 1e-3  # a BF16-output GEMM would round this much
