"""Tests for MoE routing metrics, the load heatmap and the offline wandb tracker."""
import math
import os
import sys

import pytest
import torch

from megatron_dsv3.tracking.moe_metrics import expert_load_heatmap, moe_step_metrics
from megatron_dsv3.tracking.offline_history import read_history

LOADS = torch.tensor([[4.0, 2.0, 2.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
BIASES = torch.tensor([[0.1, -0.1, 0.3, -0.3], [0.0, 0.0, 0.0, 0.0]])
NAMES = ["layer_03", "mtp_0"]


def test_moe_step_metrics_hand_computed():
    m = moe_step_metrics(LOADS, BIASES, NAMES)
    for e, v in enumerate([4.0, 2.0, 2.0, 0.0]):
        assert m[f"moe/layer_03/tokens_per_expert/{e}"] == v
    # layer_03: mean 2, max 4, population std sqrt((4+0+0+4)/4) = sqrt(2)
    assert m["moe/layer_03/load_imbalance"] == pytest.approx(2.0)
    assert m["moe/layer_03/load_cv"] == pytest.approx(math.sqrt(2) / 2)
    assert m["moe/layer_03/bias_mean"] == pytest.approx(0.0)
    assert m["moe/layer_03/bias_std"] == pytest.approx(math.sqrt((0.01 + 0.01 + 0.09 + 0.09) / 4))
    assert m["moe/layer_03/bias_min"] == pytest.approx(-0.3)
    assert m["moe/layer_03/bias_max"] == pytest.approx(0.3)
    assert m["moe/mtp_0/load_imbalance"] == pytest.approx(1.0)
    assert m["moe/mtp_0/load_cv"] == pytest.approx(0.0)
    assert m["moe/max_load_imbalance"] == pytest.approx(2.0)
    # MaxVio (max load / mean load - 1): layer_03 4 / 2 - 1; the layer without tokens 0
    assert m["moe/layer_03/maxvio"] == pytest.approx(1.0)
    assert m["moe/mtp_0/maxvio"] == 0.0
    assert (m["moe/maxvio_mean"], m["moe/maxvio_max"]) == (pytest.approx(0.5), pytest.approx(1.0))
    assert len(m) == 2 * (4 + 7) + 3
    assert all(isinstance(v, float) for v in m.values())


def test_moe_step_metrics_all_zero_layer_and_bad_shape():
    m = moe_step_metrics(torch.zeros(1, 3), torch.zeros(1, 3), ["layer_00"])
    assert m["moe/layer_00/load_imbalance"] == 1.0
    assert m["moe/layer_00/load_cv"] == 0.0
    assert all(math.isfinite(v) for v in m.values())
    with pytest.raises(ValueError):
        moe_step_metrics(LOADS, BIASES, ["only_one"])


def test_expert_load_heatmap_image_data():
    from matplotlib.figure import Figure

    older = torch.tensor([[0.0, 4.0, 2.0, 2.0], [2.0, 2.0, 2.0, 2.0]])
    fig = expert_load_heatmap([older, LOADS], NAMES)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    data = ax.images[0].get_array()
    assert data.shape == (2, 4)
    assert data[0].tolist() == pytest.approx([2.0, 1.0, 1.0, 0.0])  # latest step / its mean
    assert ax.get_title() and ax.get_xlabel() == "expert" and ax.get_ylabel()
    assert len(fig.axes) == 2  # colour bar
    avg = expert_load_heatmap([older, LOADS], NAMES, window=2).axes[0].images[0].get_array()
    assert avg[0].tolist() == pytest.approx([1.0, 1.5, 1.0, 0.5])


@pytest.fixture
def offline_env(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


def test_offline_run_history_roundtrip(offline_env):
    pytest.importorskip("wandb")
    from megatron_dsv3.tracking.wandb_tracker import WandbTracker

    save_dir = offline_env / "runs"
    with WandbTracker("dsv3-test", exp_name="t", save_dir=str(save_dir), config={"lr": 1e-3},
                      rank=0, heatmap_interval=2) as tracker:
        assert tracker.offline
        for step in range(1, 4):
            tracker.log({"lm loss": 3.0 - 0.1 * step, "lr": torch.tensor(1e-3)}, step=step)
            tracker.log_moe(LOADS * step, BIASES, NAMES, step=step)
        run_dir = tracker.run_dir
    assert run_dir and os.path.isdir(run_dir) and run_dir.startswith(str(save_dir))
    tracker.finish()  # second call is a no-op

    rows = read_history(run_dir)
    by_step = {row["_step"]: row for row in rows}
    assert sorted(by_step) == [1, 2, 3]
    for step, row in by_step.items():
        for name in NAMES:
            for e in range(4):
                expected = LOADS[NAMES.index(name), e].item() * step
                assert row[f"moe/{name}/tokens_per_expert/{e}"] == pytest.approx(expected)
            assert f"moe/{name}/load_imbalance" in row
        assert row["moe/max_load_imbalance"] == pytest.approx(2.0)
        assert row["lm loss"] == pytest.approx(3.0 - 0.1 * step)
        has_image = any(k.startswith("moe/expert_load_heatmap") for k in row)
        assert has_image == (step == 2)  # heatmap_interval=2
    image = by_step[2]
    assert image["moe/expert_load_heatmap/_type"] == "image-file"
    assert os.path.isfile(os.path.join(run_dir, "files", image["moe/expert_load_heatmap/path"]))


def test_run_file_read_while_written_gives_its_complete_records(offline_env, tmp_path):
    """wandb-core appends to the .wandb file asynchronously: a read that lands mid-record returns the records
    written so far (read_history then waits for the exit record) instead of failing on the partial one."""
    pytest.importorskip("wandb")
    from megatron_dsv3.tracking.offline_history import read_records
    from megatron_dsv3.tracking.wandb_tracker import WandbTracker

    with WandbTracker("dsv3-test", exp_name="t", save_dir=str(offline_env / "runs"), rank=0) as tracker:
        for step in range(1, 40):
            tracker.log({"lm loss": 3.0 - 0.01 * step}, step=step)
        run_dir = tracker.run_dir
    read_history(run_dir)  # the run is complete
    (path,) = [os.path.join(run_dir, f) for f in os.listdir(run_dir) if f.endswith(".wandb")]
    data = open(path, "rb").read()
    full = [r.SerializeToString() for r in read_records(path)]
    for cut in sorted({7, 20, len(data) // 3, len(data) // 2, len(data) - 3, len(data) - 1}):
        part = tmp_path / f"cut{cut}.wandb"
        part.write_bytes(data[:cut])
        got = [r.SerializeToString() for r in read_records(str(part))]
        assert got == full[: len(got)] and len(got) < len(full), cut


def test_nonzero_rank_is_noop(offline_env):
    pytest.importorskip("wandb")
    from megatron_dsv3.tracking.wandb_tracker import WandbTracker

    save_dir = offline_env / "rank1"
    tracker = WandbTracker("dsv3-test", save_dir=str(save_dir), rank=1)
    tracker.log({"x": 1.0}, step=1)
    tracker.log_moe(LOADS, BIASES, NAMES, step=1)
    tracker.finish()
    assert tracker.run_dir is None and not tracker.enabled
    assert not save_dir.exists()


def test_missing_wandb_raises(monkeypatch):
    from megatron_dsv3.tracking.wandb_tracker import WandbTracker

    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ValueError) as err:
        WandbTracker("dsv3-test", rank=1)
    assert str(err.value) == "--wandb-project: wandb is not installed; pip install 'megatron-dsv3[wandb]'"


def test_offline_without_api_key(monkeypatch, tmp_path):
    pytest.importorskip("wandb")
    from megatron_dsv3.tracking import wandb_tracker

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert not wandb_tracker._has_api_key()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_tracker._has_api_key()
