"""benchmarks/gpu_speed_check.py, the speed issue's prepared GPU check: every path runs (at toy sizes on the
CPU), and without CUDA the default run ends cleanly with a message and a JSON line."""
import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_speed_check.py")


def _run(*args):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="2")
    out = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out, json.loads(out.stdout.strip().splitlines()[-1])


def test_gpu_speed_check_skips_cleanly_without_cuda():
    out, result = _run()
    assert result["status"] == "skipped"
    assert "no CUDA device" in out.stderr and "Traceback" not in out.stderr


def test_gpu_speed_check_runs_every_section_at_toy_sizes():
    _, result = _run("--device", "cpu", "--smoke")
    assert result["status"] == "ran"
    for section in ("decode", "train", "mfu"):
        assert "error" not in result[section], result[section]
    assert result["decode"]["decode_b1_identical"] and result["decode"]["decode_b8_identical"]
    run = result["mfu"]["tiny"]
    assert "error" not in run, run
    # Counted over forward and backward: the output head alone is 6 FLOPs per weight per token (2 forward,
    # 4 backward), so a count that missed the backward or the head falls below this.
    from megatron_dsv3.presets import get_preset

    cfg = get_preset("tiny")
    tokens = 32 * 2 * 2  # --seq-length 32, micro-batch 2, 2 micro-batches (the script's SMOKE_RUNS)
    assert run["tflop_per_step"] * 1e12 > 6 * tokens * cfg.hidden_size * cfg.vocab_size
    assert 0 < run["mfu_vs_measured_peak"] < 1 and math.isfinite(run["final_lm_loss"])
