"""Runs that go wrong stop and say so in one line; checkpoints never lose what was saved and never run code."""
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed import REPO
from tests.test_pretrain_runs import COMMON


def cli(*argv: str, script=("-m", "megatron_dsv3.training.pretrain")) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, *script, *COMMON, *argv], capture_output=True, text=True, timeout=600,
                          cwd=REPO, env=env)


def one_line_error(result, *needles):
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("dsv3-pretrain: error: ") and all(n in last for n in needles), last
    return last


def summary(result) -> dict:
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads([line for line in result.stdout.splitlines() if line.startswith("{")][-1])


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A 3-step tiny run's checkpoint (never modified by the tests that read it)."""
    path = tmp_path_factory.mktemp("saved")
    summary(cli("--train-iters", "3", "--save", str(path)))
    return path


@pytest.mark.slow
def test_nan_at_step_k_stops_at_k_and_keeps_the_last_good_checkpoint(tmp_path):
    result = cli("--train-iters", "6", "--save", str(tmp_path), "--save-interval", "1",
                 script=(str(REPO / "tests" / "dist" / "nan_at_step.py"), "4"))
    one_line_error(result, "training diverged at iteration 4", str(tmp_path / "iter_0000003"))
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    assert not list(tmp_path.glob("iter_0000004*"))


@pytest.mark.slow
def test_a_longer_run_resumes_at_the_new_schedules_lr(saved, tmp_path):
    """Refused in one line without a flag saying which schedule wins; with --override-opt_param-scheduler the
    resumed steps run at the LRs of an uninterrupted 6-step schedule (megatron-core's scheduler as oracle)."""
    import torch
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    longer = summary(cli("--train-iters", "6", "--load", str(saved), "--override-opt_param-scheduler"))
    gbs = 8  # COMMON's --global-batch-size
    oracle = OptimizerParamScheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0), init_lr=0.0,
                                     max_lr=3e-3, min_lr=0.0, lr_warmup_steps=2 * gbs, lr_decay_steps=6 * gbs,
                                     lr_decay_style="cosine", start_wd=0.01, end_wd=0.01, wd_incr_steps=6 * gbs,
                                     wd_incr_style="constant")
    expected = []
    for _ in range(6):
        oracle.step(increment=gbs)
        expected.append(oracle.optimizer.param_groups[0]["lr"])
    assert longer["steps"] == 6 and longer["lrs"] == pytest.approx(expected[3:], rel=1e-12) and longer["lrs"][0] > 0


def test_a_longer_run_without_a_schedule_flag_is_refused_in_one_line(runtime, saved, capsys):
    from megatron_dsv3.training.pretrain import main

    with pytest.raises(SystemExit) as exc:
        main([*COMMON, "--train-iters", "6", "--load", str(saved)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dsv3-pretrain: error: --train-iters") and \
        "--override-opt_param-scheduler" in err[0]


def test_another_lr_on_resume_is_refused_before_loading():
    import argparse

    from megatron_dsv3.cli import UsageError
    from megatron_dsv3.training.resume import check_resumed_schedule

    class Scheduler:
        def state_dict(self):
            return {"max_lr": 1e-2, "lr_decay_steps": 48}

    args = argparse.Namespace(override_opt_param_scheduler=False, use_checkpoint_opt_param_scheduler=False)
    with pytest.raises(UsageError, match="--lr: the checkpoint's LR schedule has max_lr = 0.003, the flags give 0.01"):
        check_resumed_schedule({"max_lr": 3e-3, "lr_decay_steps": 48}, Scheduler(), args, 8)
    args.override_opt_param_scheduler = True
    check_resumed_schedule({"max_lr": 3e-3, "lr_decay_steps": 48}, Scheduler(), args, 8)


@pytest.fixture(scope="module")
def model_checkpoint(runtime, tmp_path_factory) -> Path:
    """The tiny model saved in-process with save_checkpoint (model only)."""
    import megatron_dsv3 as m
    from megatron_dsv3.checkpoint.dist import save_checkpoint

    path = tmp_path_factory.mktemp("model")
    save_checkpoint(path, 1, [m.build_model(m.presets.get_preset("tiny"), backend="local")])
    return path


@pytest.mark.parametrize("changes,tensor", [(dict(num_hidden_layers=2), "decoder.layers.2."),
                                            (dict(num_hidden_layers=6), "decoder.layers.4."),
                                            (dict(num_nextn_predict_layers=0), "mtp."),
                                            (dict(n_routed_experts=16), "experts"),
                                            (dict(hidden_size=96), "(64,) in the checkpoint and (96,) in the model")],
                         ids=["fewer-layers", "more-layers", "no-mtp", "more-experts", "wider"])
def test_a_checkpoint_of_another_model_is_refused_naming_the_tensor(model_checkpoint, changes, tensor):
    """Either direction: the first tensor that differs is named with both shapes, before anything is copied."""
    import megatron_dsv3 as m
    from megatron_dsv3.checkpoint.dist import CheckpointError, load_checkpoint

    other = m.build_model(m.presets.get_preset("tiny").replace(**changes), backend="local")
    with pytest.raises(CheckpointError, match="does not match the requested model") as err:
        load_checkpoint(model_checkpoint, [other])
    assert tensor in str(err.value) and "in the checkpoint and" in str(err.value)


def test_a_mismatched_checkpoint_is_one_line_on_the_command_line(runtime, model_checkpoint, capsys):
    from megatron_dsv3.training.pretrain import main

    with pytest.raises(SystemExit) as exc:
        main([*COMMON, "--train-iters", "3", "--load", str(model_checkpoint), "--finetune", "--num-layers", "2"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not match the requested model" in err[0] and "decoder.layers.2." in err[0]


def _copy(src: Path, dst: Path) -> Path:
    """A copy of the checkpoint folder; returns its latest iteration folder."""
    import shutil
    shutil.copytree(src, dst)
    return dst / f"iter_{int((dst / 'latest_checkpointed_iteration.txt').read_text()):07d}"


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("where,rehash", [(".metadata", False), (".metadata", True), ("rng/rank0.pt", True),
                                          ("common.pt", True), ("extra.pt", True), ("rng_rank0.json", True)],
                         ids=["metadata", "metadata-rehashed", "old-rng-pickle", "common-pt", "extra-file", "rng-json"])
def test_a_planted_pickle_is_refused_and_never_runs(model_checkpoint, tmp_path, where, rehash):
    """Whatever file holds the payload, and even with the integrity record rewritten to match it."""
    import megatron_dsv3 as m
    from megatron.core.dist_checkpointing.validation import save_integrity_manifest

    from megatron_dsv3.checkpoint.dist import CheckpointError, load_checkpoint

    iteration = _copy(model_checkpoint, tmp_path / "ckpt")
    marker = tmp_path / "PWNED"
    target = iteration / where
    target.parent.mkdir(exist_ok=True)
    target.write_bytes(pickle.dumps(_Payload(marker)))
    if rehash:
        save_integrity_manifest(str(iteration))
    with pytest.raises(CheckpointError, match="--load: "):
        load_checkpoint(tmp_path / "ckpt", [m.build_model(m.presets.get_preset("tiny"), backend="local")])
    assert not marker.exists()


def test_a_planted_pickle_is_one_line_on_the_command_line(runtime, model_checkpoint, tmp_path, capsys):
    from megatron.core.dist_checkpointing.validation import save_integrity_manifest

    from megatron_dsv3.training.pretrain import main

    iteration = _copy(model_checkpoint, tmp_path / "ckpt")
    (iteration / ".metadata").write_bytes(pickle.dumps(_Payload(tmp_path / "PWNED")))
    save_integrity_manifest(str(iteration))
    with pytest.raises(SystemExit) as exc:
        main([*COMMON, "--train-iters", "3", "--load", str(tmp_path / "ckpt"), "--finetune"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--load:" in err[0] and ".metadata" in err[0] and "posix.system" in err[0]
    assert not (tmp_path / "PWNED").exists()


def test_a_save_that_hits_a_full_disk_keeps_the_previous_checkpoint(runtime, tmp_path, monkeypatch):
    """A write error inside megatron-core's save: one error naming the folder and the cause; `latest` and the
    previous checkpoint untouched, no partial folder left."""
    import megatron_dsv3 as m
    from megatron_dsv3.checkpoint import dist as ckpt

    model = m.build_model(m.presets.get_preset("tiny"), backend="local")
    first = ckpt.save_checkpoint(tmp_path, 1, [model])

    def full_disk(state, path, *args, **kwargs):
        (Path(path) / "__0_0.distcp").write_bytes(b"partial")
        raise RuntimeError("Worker failure") from OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt.dist_checkpointing, "save", full_disk)
    with pytest.raises(ckpt.CheckpointError, match=r"--save: .*iteration iter_0000002 failed \(OSError: \[Errno 28\] "
                                                   r"No space left on device\)"):
        ckpt.save_checkpoint(tmp_path, 2, [model])
    monkeypatch.undo()
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000001", "latest_checkpointed_iteration.txt"]
    assert ckpt.load_checkpoint(tmp_path, [model])["iteration"] == 1 and Path(first).is_dir()


def test_leftovers_of_interrupted_writes_are_removed_but_never_a_complete_checkpoint(tmp_path):
    from megatron_dsv3.checkpoint.dist import remove_leftovers

    for name in ("iter_0000001", "iter_0000002.tmp-ab12", "iter_0000001.old-cd34", "iter_0000003.old-ef56"):
        (tmp_path / name).mkdir()
    (tmp_path / "iter_0000001" / "integrity.json").write_text("{}")
    remove_leftovers(tmp_path)
    # the .old copy of iteration 3 is the only copy left of it (its overwrite was interrupted): kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000001", "iter_0000003.old-ef56"]


@pytest.mark.slow
def test_a_killed_rank_ends_the_run_within_a_minute_and_the_checkpoint_stays_loadable(runtime, tmp_path):
    """kill -9 one of two torchrun workers mid-run: the other exits, torchrun exits non-zero within 60 s, no
    worker is left, and the last published checkpoint loads."""
    import signal
    import time

    import psutil

    import megatron_dsv3 as m
    from megatron_dsv3.checkpoint.dist import load_checkpoint
    from tests.distributed import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
           "-m", "megatron_dsv3.training.pretrain", *COMMON, "--train-iters", "2000",
           "--expert-model-parallel-size", "2", "--save", str(tmp_path), "--save-interval", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    run = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    latest = tmp_path / "latest_checkpointed_iteration.txt"
    deadline = time.monotonic() + 300
    while not latest.exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert latest.exists(), run.stderr.read()[-3000:] if run.poll() is not None else "no checkpoint in time"
    workers = [p for p in psutil.Process(run.pid).children() if "megatron_dsv3.training.pretrain" in p.cmdline()]
    assert len(workers) == 2
    descendants = psutil.Process(run.pid).children(recursive=True)  # helpers the workers started, too
    workers[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    returncode = run.wait(timeout=120)
    assert returncode != 0 and time.monotonic() - killed < 60
    time.sleep(2)
    alive = [p.cmdline() for p in descendants if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert alive == []
    model = m.build_model(m.presets.get_preset("tiny"), backend="local")
    assert load_checkpoint(tmp_path, [model], load_rng=False)["iteration"] >= 2
