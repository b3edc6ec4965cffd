"""The FP8 numerics bar, end to end: `dsv3-pretrain --preset tiny` for 300 steps (same seed and data) in BF16,
in emulated block-wise FP8, and in the no-scaling control; the last-20-step mean loss of FP8 stays within
0.25% of BF16 while the control's is off by more than 1%.

LR 3e-4: at higher LRs the tiny MoE model is chaotic (a rounding-level change flips routing decisions, and the
end loss moves by up to ~2% either way for any perturbation, FP32 re-association included; see docs/fp8.md),
so a single run cannot resolve 0.25% there. The three runs go in parallel (about 4 minutes on 2 cores)."""
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMMON = ["--preset", "tiny", "--seq-length", "64", "--micro-batch-size", "8", "--train-iters", "300",
          "--lr", "3e-4", "--min-lr", "1e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "20",
          "--weight-decay", "0.1", "--adam-beta2", "0.95", "--no-progress", "--bf16"]
VARIANTS = {"bf16": [], "fp8": ["--fp8-recipe", "blockwise"],
            "control": ["--fp8-recipe", "blockwise", "--fp8-no-scaling-control"]}


def _last20(extra: list[str]) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-m", "megatron_dsv3.training.pretrain", *COMMON, *extra],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    losses = json.loads(out.stdout.strip().splitlines()[-1])["lm_losses"]
    assert len(losses) == 300
    return sum(losses[-20:]) / 20


@pytest.mark.slow
def test_fp8_blockwise_stays_within_quarter_percent_of_bf16_and_the_unscaled_control_does_not():
    with ThreadPoolExecutor(max_workers=3) as pool:
        tails = dict(zip(VARIANTS, pool.map(_last20, VARIANTS.values())))
    fp8_gap = abs(tails["fp8"] - tails["bf16"]) / tails["bf16"]
    control_gap = abs(tails["control"] - tails["bf16"]) / tails["bf16"]
    assert fp8_gap <= 0.0025, tails
    assert control_gap > 0.01, tails
