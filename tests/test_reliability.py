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
    refused = cli("--train-iters", "6", "--load", str(saved))
    one_line_error(refused, "--train-iters", "--override-opt_param-scheduler")
    longer = summary(cli("--train-iters", "6", "--load", str(saved), "--override-opt_param-scheduler"))
    straight = summary(cli("--train-iters", "6"))
    assert longer["steps"] == 6 and longer["lrs"] == straight["lrs"][3:] and longer["lrs"][0] > 0
    one_line_error(cli("--train-iters", "3", "--load", str(saved), "--lr", "1e-2"), "--lr:")


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


@pytest.mark.slow
def test_a_mismatched_checkpoint_is_one_line_on_the_command_line(saved):
    one_line_error(cli("--train-iters", "3", "--load", str(saved), "--finetune", "--num-layers", "2"),
                   "does not match the requested model", "decoder.layers.2.")


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
                                          ("extra.pt", True), ("rng_rank0.json", True)],
                         ids=["metadata", "metadata-rehashed", "old-rng-pickle", "extra-file", "rng-json"])
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


@pytest.mark.slow
def test_a_planted_pickle_is_one_line_on_the_command_line(saved, tmp_path):
    iteration = _copy(saved, tmp_path / "ckpt")
    (iteration / ".metadata").write_bytes(pickle.dumps(_Payload(tmp_path / "PWNED")))
    one_line_error(cli("--train-iters", "3", "--load", str(tmp_path / "ckpt")), "--load:", ".metadata")
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
