"""The `make run` job end to end: loss falls, a checkpoint is written, wandb holds per-expert loads."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_dsv3.tracking.offline_history import read_history
from tests.distributed import REPO


@pytest.mark.slow
def test_make_run_job_trains_checkpoints_and_tracks_experts(tmp_path):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", RUN_DIR=str(tmp_path),
               WANDB_MODE="offline", OMP_NUM_THREADS="2")
    env.pop("WANDB_API_KEY", None)
    result = subprocess.run(["bash", str(REPO / "examples" / "train_tiny_cpu.sh"), "--no-progress"],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-5000:]
    summary = json.loads([line for line in result.stdout.splitlines() if line.startswith("{")][-1])
    assert {"steps", "first_lm_loss", "final_lm_loss", "tokens_per_s", "checkpoint", "wandb_dir"} <= summary.keys()
    assert summary["steps"] == 300
    assert summary["final_lm_loss"] <= 0.6 * summary["first_lm_loss"]
    assert Path(summary["checkpoint"]).is_dir() and Path(summary["checkpoint"]).is_relative_to(tmp_path)

    rows = read_history(summary["wandb_dir"])
    moe_layers = {f"layer_{i:02d}" for i in range(1, 4)} | {"mtp_0"}  # tiny: layer 0 is dense
    for layer in moe_layers:
        keys = [k for row in rows for k in row if k.startswith(f"moe/{layer}/tokens_per_expert/")]
        assert len(set(keys)) == 8, layer
    logged = {k for row in rows for k in row}
    assert {"train/lm_loss", "train/mtp_loss", "train/seq_balance_loss", "train/grad_norm", "train/lr",
            "train/tokens_per_s", "moe/layer_01/load_imbalance", "moe/layer_01/bias_mean"} <= logged
