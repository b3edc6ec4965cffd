"""DualPipe and DualPipeV on gloo against megatron-core's single-process forward_backward_no_pipelining."""
import pytest
import torch
from megatron.core.pipeline_parallel import schedules

import megatron_dsv3 as m
from megatron_dsv3.model.init import init_layout_independent
from megatron_dsv3.training.step import forward_step
from tests.dist.dualpipe_grads import batches
from tests.distributed import gloo_ranks


def _reference(layers: int, microbatches: int, forward_only: bool):
    cfg = m.presets.get_preset("tiny").replace(num_hidden_layers=layers)
    model = m.build_model(cfg)
    init_layout_independent(model, 7)
    reports = schedules.forward_backward_no_pipelining(  # looked up late: the CPU shims wrap it
        forward_step_func=forward_step, data_iterator=iter(batches(cfg, microbatches, seq=16)), model=[model],
        num_microbatches=microbatches, seq_length=16, micro_batch_size=2, forward_only=forward_only)
    losses = [[float(v) for v in r["lm loss"]] for r in reports]
    grads = {n: p.grad.reshape(-1) for n, p in model.named_parameters() if p.grad is not None}
    return losses, grads


CASES = [("dualpipe", 2, 4, 4, 1), ("dualpipe", 4, 4, 8, 1), ("dualpipev", 2, 4, 4, 1), ("dualpipev", 4, 8, 8, 1),
         ("dualpipe", 2, 4, 4, 2), ("dualpipev", 2, 4, 4, 2)]


def _losses_in_order(ranks: list[dict], pp: int) -> list:
    """Per-micro-batch loss reports in the reference's order: DP rank by DP rank; each DP rank's reports are
    all on its last pipeline rank (where megatron-core leaves them), none elsewhere."""
    assert all(r["losses"] == [] for r in ranks if r["pp_rank"] != pp - 1)
    return [loss for r in sorted(ranks, key=lambda r: r["dp_rank"]) if r["pp_rank"] == pp - 1 for loss in r["losses"]]


@pytest.mark.slow
@pytest.mark.parametrize("schedule,pp,layers,microbatches,ep", CASES,
                         ids=[f"{c[0]}-pp{c[1]}" + (f"-ep{c[4]}" if c[4] > 1 else "") for c in CASES])
def test_losses_and_gradients_match_no_pipelining(runtime, tmp_path, schedule, pp, layers, microbatches, ep):
    ranks = gloo_ranks("dualpipe_grads.py", pp * ep, tmp_path, schedule, str(layers), str(microbatches), "0", str(ep))
    ref_losses, ref_grads = _reference(layers, microbatches * ep, forward_only=False)
    got = _losses_in_order(ranks, pp)
    assert len(got) == microbatches * ep
    for (s, n), (rs, rn) in zip(got, ref_losses):
        assert n == rn and s == pytest.approx(rs, rel=1e-6)
    grads = {name: torch.tensor(g) for r in ranks for name, g in r["grads"].items()}
    assert grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        assert (grads[name] - ref).norm() <= 1e-5 * ref.norm() + 1e-12, name


@pytest.mark.slow
def test_forward_only_gives_the_same_losses(runtime, tmp_path):
    ranks = gloo_ranks("dualpipe_grads.py", 2, tmp_path, "dualpipev", "4", "4", "1")
    ref_losses, _ = _reference(4, 4, forward_only=True)
    assert ranks[0]["losses"] == []
    assert [s for s, _ in ranks[1]["losses"]] == pytest.approx([s for s, _ in ref_losses], rel=1e-6)
    assert ranks[0]["grads"] == {} and ranks[1]["grads"] == {}


@pytest.mark.slow
def test_overlapped_pairs_run_both_halves_at_once_and_change_no_number(tmp_path):
    """PP=2 x EP=2, every all-to-all delayed 50 ms: with overlap each F&B pair's forward (helper thread) and
    backward (this thread) run at the same time, each chunk on its own communicators; without, one after
    the other. The losses are bitwise the same either way (the gradients are checked above)."""
    ranks = gloo_ranks("dualpipe_overlap.py", 4, tmp_path, "0.05")
    for r in ranks:
        assert r["overlap"]["losses"] == r["sequential"]["losses"]
        for mode in ("overlap", "sequential"):
            halves = r[mode]["halves"]
            assert halves and len(halves) % 2 == 0
            for a, b in zip(halves[::2], halves[1::2]):
                (fwd, bwd) = (a, b) if a[0] == "F" else (b, a)
                shared = min(fwd[3], bwd[3]) - max(fwd[2], bwd[2])
                shorter = min(fwd[3] - fwd[2], bwd[3] - bwd[2])
                if mode == "overlap":
                    assert fwd[4].startswith("dualpipe-forward") and bwd[4] == "MainThread"
                    assert shared > 0.5 * shorter, (fwd, bwd)
                else:
                    assert fwd[4] == bwd[4] == "MainThread" and shared <= 0


def test_split_backward_defers_linear_weight_grads_and_w_restores_them_bitwise(runtime):
    """B with `split` leaves every megatron-core linear's weight gradient for W; after W all gradients equal
    an ordinary backward's bit for bit (megatron-core's own formulas)."""
    from megatron_dsv3.pipeline.wgrad import deferred_weight_grads, enable_wgrad_deferral, run_all

    cfg = m.presets.get_preset("tiny")
    batch = batches(cfg, 1, seq=16)[0]

    def loss_of(model):
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                       loss_mask=batch["loss_mask"])
        return output.float().sum()

    reference, deferred = m.build_model(cfg), m.build_model(cfg)
    for model in (reference, deferred):
        init_layout_independent(model, 7)
    loss_of(reference).backward()
    linears = enable_wgrad_deferral(deferred)
    assert linears >= 10  # MLA projections, MLPs, shared and routed experts, MTP projection, output head
    with deferred_weight_grads() as pending:
        loss_of(deferred).backward()
    assert len(pending) >= linears - 1  # every linear used by this batch (a routed expert may get no token)
    names = {n for n, _ in deferred.named_parameters()}
    waiting = {n for n, p in deferred.named_parameters() if p.grad is None and n.endswith("weight")}
    assert any("linear_fc1" in n for n in waiting) and any("linear_q" in n for n in waiting)
    assert not any("layernorm" in n or n.endswith("norm.weight") for n in waiting)  # norms are not deferred
    run_all(pending)
    ref = dict(reference.named_parameters())
    for name in names:
        got, want = dict(deferred.named_parameters())[name].grad, ref[name].grad
        assert (got is None) == (want is None), name
        if want is not None:
            assert torch.equal(got, want), name
