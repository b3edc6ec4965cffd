"""Multi-process gloo runs: expert parallelism and the expert-bias all-reduce."""
import pytest
import torch

from tests.distributed import gloo_ranks


@pytest.mark.slow
def test_ep2_expert_bias_equal_on_all_ranks_and_follows_global_sign_rule(tmp_path):
    ranks = gloo_ranks("ep_bias_step.py", 2, tmp_path, "2")
    assert ranks[0]["loss"] != ranks[1]["loss"]  # each rank trained on its own tokens
    assert ranks[0]["after"] == ranks[1]["after"]
    gamma = ranks[0]["gamma"]
    for layer, before in enumerate(ranks[0]["before"]):
        global_load = torch.tensor(ranks[0]["local_loads"][layer]) + torch.tensor(ranks[1]["local_loads"][layer])
        expected = torch.tensor(before) + gamma * torch.sign(global_load.mean() - global_load)
        assert torch.allclose(torch.tensor(ranks[0]["after"][layer]), expected, atol=0, rtol=0)
        assert not torch.equal(torch.tensor(ranks[0]["after"][layer]), torch.tensor(before))


@pytest.mark.slow
def test_tp2_sequence_parallel_loss_equals_single_process(tmp_path):
    """Tensor parallelism (with sequence parallelism) on gloo reproduces the one-process loss."""
    single = gloo_ranks("forward_loss.py", 1, tmp_path / "tp1", "1", "1")[0]
    ranks = gloo_ranks("forward_loss.py", 2, tmp_path / "tp2", "2", "1")
    for r in ranks:
        assert r["loss"] == pytest.approx(single["loss"], rel=1e-6)
