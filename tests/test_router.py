"""DeepSeek-V3 routing against a per-token brute-force oracle, and the megatron-core difference it fixes."""

import pytest
import torch
from megatron.core.transformer.moe.moe_utils import group_limited_topk

from megatron_dsv3.moe.router import deepseek_topk


def _oracle(logits, bias, topk, n_group, topk_group, scaling):
    """Per token: best groups by top-2 biased sum, best experts inside them by biased score, unbiased gates."""
    scores = torch.sigmoid(logits.double())
    biased = scores + bias.double()
    per_group = logits.shape[1] // n_group
    out = []
    for t in range(logits.shape[0]):
        group_score = [sorted(biased[t, g * per_group:(g + 1) * per_group].tolist())[-2:] for g in range(n_group)]
        groups = sorted(range(n_group), key=lambda g: -sum(group_score[g]))[:topk_group]
        allowed = [e for g in groups for e in range(g * per_group, (g + 1) * per_group)]
        chosen = sorted(allowed, key=lambda e: -biased[t, e].item())[:topk]
        gates = scores[t, chosen] / scores[t, chosen].sum() * scaling
        out.append(dict(zip(chosen, gates.tolist())))
    return out


@pytest.mark.parametrize("experts,n_group,topk_group,topk", [(16, 4, 2, 4), (16, 4, 2, 6), (12, 3, 1, 2), (32, 8, 4, 8)])
def test_deepseek_topk_matches_oracle(experts, n_group, topk_group, topk):
    logits, bias = torch.randn(64, experts), 0.3 * torch.randn(experts)
    gates, idx = deepseek_topk(logits, topk, expert_bias=bias, num_groups=n_group, group_topk=topk_group,
                               scaling_factor=2.5)
    for t, expected in enumerate(_oracle(logits, bias, topk, n_group, topk_group, 2.5)):
        got = dict(zip(idx[t].tolist(), gates[t].tolist()))
        assert got.keys() == expected.keys()
        for e in got:
            assert got[e] == pytest.approx(expected[e], rel=1e-6)


def test_megatron_group_score_differs_when_topk_per_group_is_not_two():
    """The trap we own the router for: megatron-core sums top-(topk/group_topk) per group, DeepSeek top-2."""
    torch.manual_seed(1)
    differ = 0
    for _ in range(20):
        scores = torch.rand(32, 16)
        _, ours = deepseek_topk(torch.logit(scores), 6, num_groups=4, group_topk=2)
        _, theirs = group_limited_topk(scores, 6, 32, 16, 4, 2)
        differ += sum(set(a.tolist()) != set(b.tolist()) for a, b in zip(ours, theirs))
    assert differ > 0


def test_bias_steers_selection_but_not_gates():
    logits = torch.zeros(1, 8)
    bias = torch.tensor([0, 0, 0, 0, 0, 0, 1.0, 1.0])
    gates, idx = deepseek_topk(logits, 2, expert_bias=bias, scaling_factor=1.0)
    assert set(idx[0].tolist()) == {6, 7}
    assert torch.allclose(gates, torch.full((1, 2), 0.5))


def _v2_group_limited_greedy(logits, topk, n_group, topk_group):
    """DeepSeek-V2's routing, token by token: softmax over all experts, keep the topk_group groups whose best
    score is highest, take the top-k experts among them; gates are the (unnormalised) softmax scores."""
    out = []
    for row in torch.softmax(logits.double(), dim=-1):
        per_group = row.view(n_group, -1)
        kept = sorted(range(n_group), key=lambda g: -per_group[g].max().item())[:topk_group]
        allowed = [g * per_group.shape[1] + i for g in kept for i in range(per_group.shape[1])]
        chosen = sorted(allowed, key=lambda e: -row[e].item())[:topk]
        out.append({e: row[e].item() for e in chosen})
    return out


def test_v2_group_limited_greedy_scores_a_group_by_its_maximum():
    """`topk_method: group_limited_greedy` (DeepSeek-V2) from a config.json routes as the official rule."""
    from megatron_dsv3.checkpoint.hf import config_from_hf
    from megatron_dsv3.config import DSV3Config

    torch.manual_seed(3)
    logits = torch.randn(64, 16)
    gates, idx = deepseek_topk(logits, 6, score_function="softmax", num_groups=4, group_topk=2,
                               norm_topk_prob=False, group_score="max")
    differs_from_v3 = False
    _, v3 = deepseek_topk(logits, 6, score_function="softmax", num_groups=4, group_topk=2, norm_topk_prob=False)
    for t, expected in enumerate(_v2_group_limited_greedy(logits, 6, 4, 2)):
        got = dict(zip(idx[t].tolist(), gates[t].tolist()))
        assert got.keys() == expected.keys()
        assert all(got[e] == pytest.approx(expected[e], rel=1e-6) for e in got)
        differs_from_v3 |= set(v3[t].tolist()) != set(expected)
    assert differs_from_v3  # the two group scores disagree on these logits, so the test can fail
    base = DSV3Config().__dict__
    hf = {k: v for k, v in base.items() if k != "rope_scaling"} | {"topk_method": "group_limited_greedy",
                                                                    "scoring_func": "softmax", "hidden_act": "silu"}
    assert config_from_hf(hf).topk_method == "group_limited_greedy"
    with pytest.raises(ValueError, match="topk_method: expected one of"):
        config_from_hf({**hf, "topk_method": "sinkhorn"})
