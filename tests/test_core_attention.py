"""The local MLA core attention: its fused causal path against a plain masked-softmax oracle."""
import pytest
import torch
from megatron.core.transformer.enums import AttnMaskType

import megatron_dsv3 as m
from megatron_dsv3.attention.core_attention import MLACoreAttention
from megatron_dsv3.model.transformer_config import to_mcore_config


def _oracle(q, k, v, scale, offset):
    """softmax(q k^T * scale) v with query i seeing keys j <= i + offset, in float64; [s, b, heads, dim] in."""
    q, k, v = (t.double().permute(1, 2, 0, 3) for t in (q, k, v))
    scores = (q @ k.transpose(-1, -2)) * scale
    allowed = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril(diagonal=offset)
    out = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
    b, h, s, dv = out.shape
    return out.permute(2, 0, 1, 3).reshape(s, b, h * dv)


@pytest.mark.parametrize("sq,sk,dqk,dv", [(37, 37, 24, 16), (37, 37, 16, 16), (5, 37, 24, 16)],
                         ids=["causal-narrow-values", "causal-equal-heads", "cached-decode"])
def test_causal_core_attention_matches_masked_softmax(runtime, sq, sk, dqk, dv):
    config = to_mcore_config(m.presets.get_preset("tiny"))
    attn = MLACoreAttention(config, layer_number=1, attn_mask_type=AttnMaskType.causal, softmax_scale=0.3)
    q = torch.randn(sq, 2, 3, dqk, requires_grad=True)
    k = torch.randn(sk, 2, 3, dqk, requires_grad=True)
    v = torch.randn(sk, 2, 3, dv, requires_grad=True)
    out = attn(q, k, v)
    assert out.shape == (sq, 2, 3 * dv)
    torch.testing.assert_close(out.double(), _oracle(q, k, v, 0.3, sk - sq), rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(_oracle(q, k, v, 0.3, sk - sq), (q, k, v), grad.double())
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
