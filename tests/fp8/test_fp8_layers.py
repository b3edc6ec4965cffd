"""FP8 tensor-parallel linears, their spec wiring, the CLI recipe mapping and the native path's scale layouts."""
import argparse

import pytest
import torch

import megatron_dsv3.fp8.linear as fp8_linear_module
from megatron_dsv3.fp8 import FP8Config, fp8_linear, quantize_blockwise
from megatron_dsv3.fp8.layers import FP8ColumnParallelLinear, FP8RowParallelLinear, fp8_linear_classes
from megatron_dsv3.fp8.native import native_available, pad_operand, prepare_scale
from megatron_dsv3.fp8.recipe import TE_ONLY_RECIPES, fp8_model_kwargs


def _tiny_mcore_config():
    from megatron_dsv3.model.transformer_config import to_mcore_config
    from megatron_dsv3.presets import get_preset

    return to_mcore_config(get_preset("tiny"))


@pytest.mark.parametrize("kind", ["column", "row"])
def test_fp8_parallel_linear_matches_fp8_linear(runtime, kind):
    """Forward and both gradients of the layer equal fp8_linear on the same (TP=1) shard, bit for bit."""
    cfg = _tiny_mcore_config()
    init = torch.nn.init.normal_
    if kind == "column":
        layer = FP8ColumnParallelLinear(200, 136, config=cfg, init_method=init, bias=True, gather_output=False)
    else:
        layer = FP8RowParallelLinear(200, 136, config=cfg, init_method=init, bias=False, input_is_parallel=True,
                                     skip_bias_add=False)
    x = torch.randn(7, 3, 200, requires_grad=True)
    y, _ = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    x2 = x.detach().clone().requires_grad_(True)
    w2 = layer.weight.detach().clone().requires_grad_(True)
    b2 = layer.bias.detach().clone().requires_grad_(True) if layer.bias is not None else None
    y2 = fp8_linear(x2, w2, b2 if kind == "column" else None, FP8Config())
    if kind == "row" and b2 is not None:
        y2 = y2 + b2
    y2.backward(g)
    assert torch.equal(y, y2)
    assert torch.equal(x.grad, x2.grad)
    assert torch.equal(layer.weight.grad, w2.grad)
    # and it really is FP8: differs from the FP32 GEMM
    assert not torch.equal(y, torch.nn.functional.linear(x, layer.weight, layer.bias if kind == "column" else None))


def test_fp8_linear_classes_bind_config():
    ctl = FP8Config(scaling="none")
    col, row = fp8_linear_classes(ctl)
    assert issubclass(col, FP8ColumnParallelLinear) and issubclass(row, FP8RowParallelLinear)
    assert col.fp8_config == ctl and fp8_linear_classes(ctl) == (col, row)
    assert fp8_linear_classes(FP8Config()) == (FP8ColumnParallelLinear, FP8RowParallelLinear)


def test_no_scaling_control_flushes_small_values():
    x = torch.full((2, 128), 1e-4)
    w = torch.full((4, 128), 1e-2)
    assert fp8_linear(x, w, config=FP8Config(scaling="none")).abs().max() == 0  # 1e-4 underflows E4M3
    assert fp8_linear(x, w).abs().min() > 0


def test_high_precision_modules_never_reach_the_quantizer(runtime, monkeypatch):
    """Forward+backward of the tiny model in FP8: every linear of MLA, dense MLP, shared and routed experts
    and MTP is quantized; the embedding, output head, router, norms and core attention never are."""
    import megatron_dsv3 as m

    seen = []
    real = fp8_linear_module.quantize_dequantize_blockwise

    def spy(x, *args, **kwargs):
        seen.append((x, kwargs.get("name")))
        return real(x, *args, **kwargs)

    monkeypatch.setattr(fp8_linear_module, "quantize_dequantize_blockwise", spy)
    cfg = m.presets.get_preset("tiny")
    model = m.build_model(cfg, backend="local", fp8_recipe=FP8Config())
    # every routed expert must see tokens: record the weights fed to the quantizer by identity
    core_inputs = []
    for name, mod in model.named_modules():
        if name.endswith("core_attention"):
            mod.register_forward_pre_hook(lambda _m, a, kw=None: core_inputs.extend(t for t in a
                                                                                   if torch.is_tensor(t)))
    b, s = 4, 32
    ids = torch.randint(0, cfg.vocab_size, (b, s))
    pos = torch.arange(s).expand(b, s)
    logits = model(ids, pos, None)
    logits.float().sum().backward()

    weight_ids = {id(t) for t, name in seen if name == "weight"}
    fed = {id(t) for t, _ in seen}
    fp8_names, hp_names = [], []
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.nn.Parameter):
            continue
        if isinstance(mod, (FP8ColumnParallelLinear, FP8RowParallelLinear)):
            fp8_names.append(name)
        else:
            hp_names.append(name)
            assert id(w) not in fed, f"{name} ({type(mod).__name__}) reached the quantizer"
    routed = [n for n in fp8_names if "local_experts" in n]
    # routed experts with no tokens are skipped; the FP8 weights that did run were quantized directly
    ran = [n for n in fp8_names if id(dict(model.named_modules())[n].weight) in weight_ids]
    assert set(fp8_names) - set(routed) <= set(ran), set(fp8_names) - set(routed) - set(ran)
    assert len([n for n in routed if n in ran]) >= len(routed) // 2
    for key in ("linear_q_down_proj", "linear_q_up_proj", "linear_kv_down_proj", "linear_kv_up_proj",
                "linear_proj", "mlp.linear_fc1", "mlp.linear_fc2", "shared_experts.linear_fc1",
                "shared_experts.linear_fc2", "eh_proj"):
        assert any(key in n for n in ran), key
    # high-precision modules present and excluded
    kinds = " ".join(hp_names)
    for key in ("embedding", "output_layer", "router", "layernorm"):
        assert key in kinds, key
    assert "output_layer" not in " ".join(fp8_names)
    # no attention-core input (q, k, v) was quantized, nor a tensor with the embedding/head's vocab dim
    assert core_inputs and all(id(t) not in fed for t in core_inputs)
    assert all(cfg.vocab_size not in tuple(t.shape) for t, _ in seen)


def _ns(**kw):
    base = dict(dsv3_backend=None, fp8_no_scaling_control=False, fp8_recipe="delayed", fp8=None)
    base.update(kw)
    return argparse.Namespace(**base)


def model_kwargs_from_args(args, explicit):
    return fp8_model_kwargs(args, explicit, args.dsv3_backend)


@pytest.mark.parametrize("recipe", TE_ONLY_RECIPES)
def test_te_only_recipe_is_a_usage_error(recipe):
    with pytest.raises(ValueError, match=f"--fp8-recipe: '{recipe}' needs Transformer Engine"):
        model_kwargs_from_args(_ns(fp8_recipe=recipe, dsv3_backend="local"), {"fp8_recipe"})
    if recipe == "delayed":  # --fp8-format alone keeps Megatron's default recipe, which is TE's
        with pytest.raises(ValueError, match="needs Transformer Engine"):
            model_kwargs_from_args(_ns(fp8="e4m3"), {"fp8"})


def test_recipe_mapping():
    assert model_kwargs_from_args(_ns(), set()) == {"backend": None}
    kw = model_kwargs_from_args(_ns(fp8_recipe="blockwise"), {"fp8_recipe"})
    gemm = "native" if native_available() else "emulated"
    assert kw["backend"] == "local" and kw["fp8_recipe"] == FP8Config(gemm=gemm)
    kw = model_kwargs_from_args(_ns(fp8_recipe="blockwise", fp8_no_scaling_control=True), {"fp8_recipe"})
    assert kw["fp8_recipe"].scaling == "none"
    with pytest.raises(ValueError, match="--fp8-format"):
        model_kwargs_from_args(_ns(fp8_recipe="blockwise", fp8="hybrid"), {"fp8_recipe", "fp8"})
    with pytest.raises(ValueError, match="--fp8-no-scaling-control"):
        model_kwargs_from_args(_ns(fp8_no_scaling_control=True), set())


def test_cli_te_only_recipe_exits_2(capsys):
    from megatron_dsv3.training.pretrain import main

    with pytest.raises(SystemExit) as e:
        main(["--preset", "tiny", "--fp8-recipe", "tensorwise", "--train-iters", "1", "--seq-length", "16",
              "--micro-batch-size", "1", "--dsv3-backend", "local"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("dsv3-pretrain: error: --fp8-recipe: 'tensorwise' needs Transformer Engine")


def test_native_scale_layouts_on_cpu():
    """What the native path would hand torch: shapes, strides and values of our scale_inv."""
    a = pad_operand(torch.randn(50, 300))
    assert a.shape == (64, 384) and torch.equal(a[:50, :300], a[:50, :300]) and a[50:].abs().sum() == 0
    b = pad_operand(torch.randn(272, 384))
    _, asi = quantize_blockwise(a, (1, 128))
    _, bsi = quantize_blockwise(b, (128, 128))
    sa = prepare_scale(asi, (1, 128), "a")
    assert sa.shape == (64, 3) and sa.stride() == (1, 64) and torch.equal(sa, asi)
    sb = prepare_scale(bsi, (128, 128), "b")  # (L4, ceil(N/128)) with stride (1, L4)
    assert sb.shape == (4, 3) and sb.stride() == (1, 4) and torch.equal(sb[:3], bsi.t())
    assert torch.equal(prepare_scale(bsi, (128, 128), "b", api="v1"), bsi.t())
    sb1 = prepare_scale(asi, (1, 128), "b", api="v1")
    assert sb1.shape == (3, 64) and torch.equal(sb1, asi.t())
    # zero padding changes no code or scale of the real entries
    x = torch.randn(50, 300)
    q0, s0 = quantize_blockwise(x, (1, 128))
    q1, s1 = quantize_blockwise(pad_operand(x), (1, 128))
    assert torch.equal(q1[:50, :300].view(torch.uint8), q0.view(torch.uint8)) and torch.equal(s1[:50], s0)
    assert not native_available()  # CPU here


def test_backend_fp8_variant(runtime):
    from megatron_dsv3.model.backends import FP8LocalSpecProvider, get_backend

    be = get_backend("local", fp8_recipe=FP8Config())
    assert isinstance(be.provider, FP8LocalSpecProvider)
    assert be.provider.column_parallel_linear() is FP8ColumnParallelLinear
    assert be.provider.row_parallel_linear() is FP8RowParallelLinear
    assert issubclass(be.down_proj_linear, FP8ColumnParallelLinear)
    experts = be.provider.grouped_mlp_modules(False)
    assert experts.keywords["submodules"].linear_fc1 is FP8ColumnParallelLinear
    assert get_backend("local").provider.column_parallel_linear().__name__ == "ColumnParallelLinear"


def test_te_mapping_reaches_megatron_core_fields(monkeypatch):
    """With TE the flags become megatron-core's FP8 fields (TE itself cannot run here)."""
    import megatron_dsv3.model.builder as builder
    from megatron_dsv3.presets import get_preset

    seen = {}

    class Stop(Exception):
        pass

    def fake(config, **overrides):
        seen.update(overrides)
        raise Stop

    monkeypatch.setattr(builder, "to_mcore_config", fake)
    monkeypatch.setattr("megatron_dsv3.runtime.te_available", lambda: True)
    kw = model_kwargs_from_args(_ns(fp8_recipe="blockwise", fp8="e4m3"), {"fp8_recipe", "fp8"})
    assert kw == {"backend": "te", "fp8": "e4m3", "fp8_recipe": "blockwise"}
    with pytest.raises(Stop):
        builder.build_model(get_preset("tiny"), **kw)
    assert seen == {"fp8": "e4m3", "fp8_recipe": "blockwise"}
