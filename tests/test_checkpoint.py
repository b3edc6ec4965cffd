"""Distributed training checkpoints: round trip, bitwise resume, atomic publish, corrupt inputs, EP=2."""
import random
import shutil

import numpy as np
import pytest
import torch
from megatron.core import tensor_parallel

import megatron_dsv3 as m
from megatron_dsv3.checkpoint import dist as ckpt
from megatron_dsv3.checkpoint.dist import CheckpointError, load_checkpoint, save_checkpoint
from tests.distributed import gloo_ranks
from tests.dist.ckpt_common import batch, build, expert_biases, train_step

@pytest.fixture(scope="module")
def cfg(runtime):
    runtime.initialize(tp=1, pp=1, ep=1, seed=1234)
    return m.presets.get_preset("tiny")


def save(path, iteration, ddp, opt, sched, **state):
    return save_checkpoint(path, iteration, [ddp], opt, sched, dict(iteration=iteration, **state))


def params(ddp):
    return {n: p.detach().clone() for n, p in ddp.module.named_parameters()}


def adam_state(ddp, opt):
    names = {id(p): n for n, p in ddp.module.named_parameters()}
    state = {names[id(p)]: s["exp_avg"].clone() for o in opt.chained_optimizers
             for p, s in o.optimizer.state.items()}
    steps = [float(s["step"]) for o in opt.chained_optimizers for s in o.optimizer.state.values()]
    return state, steps


def draws():
    tracker = tensor_parallel.get_cuda_rng_tracker()
    with tracker.fork():
        forked = torch.rand(3)
    return random.random(), float(np.random.rand()), torch.rand(4).tolist(), forked.tolist()


def trained(cfg, steps, seed=0):
    torch.manual_seed(seed)
    ddp, opt, sched = build(cfg)
    losses = [train_step(ddp, opt, sched, batch(cfg, s)) for s in range(steps)]
    return ddp, opt, sched, losses


def test_round_trip_model_bias_optimizer_scheduler_state_rng(cfg, tmp_path):
    ddp, opt, sched, _ = trained(cfg, 2)
    want_params, want_bias, (want_adam, want_steps) = params(ddp), expert_biases(ddp), adam_state(ddp, opt)
    assert set(want_steps) == {2.0}
    assert want_bias and any(b.abs().sum() > 0 for b in want_bias.values())  # the bias update ran
    assert want_adam and all(v.abs().sum() > 0 for v in want_adam.values())
    want_sched = sched.state_dict()
    out = save(tmp_path, 2, ddp, opt, sched, consumed_samples=4, note="x")
    assert out == str(tmp_path / "iter_0000002")
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    want_draws = draws()

    ddp2, opt2, sched2, _ = trained(cfg, 1, seed=7)
    assert not torch.equal(params(ddp2)["embedding.word_embeddings.weight"],
                           want_params["embedding.word_embeddings.weight"])
    assert sched2.state_dict() != want_sched
    state = load_checkpoint(tmp_path, [ddp2], opt2, sched2)
    assert draws() == want_draws
    assert state == {"iteration": 2, "consumed_samples": 4, "note": "x"}
    got = params(ddp2)
    assert got.keys() == want_params.keys() and all(torch.equal(got[k], want_params[k]) for k in got)
    got_bias = expert_biases(ddp2)
    assert got_bias.keys() == want_bias.keys() and all(torch.equal(got_bias[k], want_bias[k]) for k in got_bias)
    got_adam, got_steps = adam_state(ddp2, opt2)
    assert got_steps == want_steps
    assert got_adam.keys() == want_adam.keys() and all(torch.equal(got_adam[k], want_adam[k]) for k in got_adam)
    assert sched2.state_dict() == want_sched
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_resume_is_bitwise_identical(cfg, tmp_path):
    ddp, opt, sched, _ = trained(cfg, 3)
    save(tmp_path, 3, ddp, opt, sched)
    straight = [train_step(ddp, opt, sched, batch(cfg, s)) for s in (3, 4)]

    torch.manual_seed(99)
    ddp2, opt2, sched2 = build(cfg)
    assert load_checkpoint(tmp_path, [ddp2], opt2, sched2)["iteration"] == 3
    resumed = [train_step(ddp2, opt2, sched2, batch(cfg, s)) for s in (3, 4)]
    assert resumed == straight


def test_crash_while_publishing_keeps_previous_checkpoint(cfg, tmp_path, monkeypatch):
    ddp, opt, sched, _ = trained(cfg, 1)
    save(tmp_path, 1, ddp, opt, sched)
    at_1 = params(ddp)
    train_step(ddp, opt, sched, batch(cfg, 1))
    real_rename = ckpt._rename

    def crash(src, dst):
        if ".tmp-" in str(src):
            raise OSError("simulated crash during rename")
        real_rename(src, dst)

    monkeypatch.setattr(ckpt, "_rename", crash)
    for iteration in (2, 1):  # a new iteration, then overwriting the one `latest` names
        with pytest.raises(ckpt.CheckpointError, match="simulated crash"):  # one line for the CLI
            save(tmp_path, iteration, ddp, opt, sched)
        assert (tmp_path / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
        assert not (tmp_path / "iter_0000002").exists() and (tmp_path / "iter_0000001").is_dir()
        assert any(".tmp-" in p.name for p in tmp_path.iterdir())  # the half-published copy is left aside
    monkeypatch.undo()

    torch.manual_seed(5)
    ddp2, opt2, sched2 = build(cfg)
    assert load_checkpoint(tmp_path, [ddp2], opt2, sched2)["iteration"] == 1
    got = params(ddp2)
    assert all(torch.equal(got[k], at_1[k]) for k in at_1)
    # a kill between "move the old copy aside" and "rename the new one in": load finds the old copy
    (tmp_path / "iter_0000001").rename(tmp_path / "iter_0000001.old-deadbeef")
    assert load_checkpoint(tmp_path, [ddp2], opt2, sched2)["iteration"] == 1


@pytest.fixture(scope="module")
def saved(cfg, tmp_path_factory):
    root = tmp_path_factory.mktemp("good")
    ddp, opt, sched, _ = trained(cfg, 1)
    save(root, 1, ddp, opt, sched)
    return root


def _garble_latest(d):
    (d / "latest_checkpointed_iteration.txt").write_text("1O\x00")
    return d / "latest_checkpointed_iteration.txt"


def _drop_iter_dir(d):
    shutil.rmtree(d / "iter_0000001")
    return d / "iter_0000001"


def _truncate_shard(d):
    shard = sorted((d / "iter_0000001").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return d / "iter_0000001"


def _drop_latest(d):
    (d / "latest_checkpointed_iteration.txt").unlink()
    return d / "latest_checkpointed_iteration.txt"


def _missing_dir(d):
    return d / "nope"


@pytest.mark.parametrize("damage", [_drop_iter_dir, _truncate_shard, _drop_latest, _missing_dir])
def test_corrupt_checkpoint_raises_checkpoint_error(cfg, saved, tmp_path, damage):
    work = tmp_path / "ckpt"
    shutil.copytree(saved, work)
    named = damage(work)
    load_dir = named if damage is _missing_dir else work
    torch.manual_seed(3)
    ddp, opt, sched = build(cfg)
    before = params(ddp)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(load_dir, [ddp], opt, sched)
    message = str(info.value)
    assert message.startswith("--load: ") and str(named) in message, message
    assert isinstance(info.value, ValueError)
    assert all(torch.equal(p, before[n]) for n, p in params(ddp).items())  # nothing was changed


def test_a_garbled_latest_falls_back_to_the_newest_intact_checkpoint(cfg, saved, tmp_path):
    """Only the intact iteration 1 is left to load; with nothing intact it is one line naming `latest`."""
    work = tmp_path / "ckpt"
    shutil.copytree(saved, work)
    latest = _garble_latest(work)
    shutil.copytree(work / "iter_0000001", work / "iter_0000002")
    (work / "iter_0000002" / "integrity.json").unlink()  # an interrupted write: not intact
    ddp, opt, sched = build(cfg)
    assert load_checkpoint(work, [ddp], opt, sched)["iteration"] == 1
    shutil.rmtree(work / "iter_0000001")
    with pytest.raises(CheckpointError, match="garbled"):
        load_checkpoint(work, [ddp], opt, sched)
    assert latest.is_file()


@pytest.mark.slow
def test_ep2_save_load_round_trip(tmp_path):
    results = gloo_ranks("ckpt_ep_roundtrip.py", 2, tmp_path, "2")
    for rank, r in enumerate(results):
        assert r["mismatched"] == [], (rank, r["mismatched"])
        assert r["checked"] > 0 and r["experts_checked"] > 0 and r["bias_checked"] > 0
        assert r["changed_by_load"] > 0  # the fresh model differed before loading
        assert r["train_state"]["iteration"] == 2
    assert results[0]["expert_digest"] != results[1]["expert_digest"]  # each rank holds its own experts
