"""End-to-end dsv3-pretrain runs: exact resume, and parallel layouts against the one-process run."""
import json
import os
import subprocess
import sys

import pytest

from tests.distributed import REPO, free_port

COMMON = ["--preset", "tiny", "--seq-length", "32", "--micro-batch-size", "4", "--global-batch-size", "8",
          "--lr", "3e-3", "--lr-warmup-iters", "2", "--lr-decay-style", "cosine", "--no-progress"]


def pretrain(*argv: str, nproc: int = 1) -> dict:
    """Run dsv3-pretrain (under torchrun when nproc > 1) and return its final JSON line."""
    module = ["-m", "megatron_dsv3.training.pretrain"]
    launcher = [sys.executable] + (["-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                                    f"--master-port={free_port()}"] + module if nproc > 1 else module)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    result = subprocess.run(launcher + COMMON + list(argv), capture_output=True, text=True, timeout=600,
                            cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr[-5000:]
    return json.loads([line for line in result.stdout.splitlines() if line.startswith("{")][-1])


@pytest.mark.slow
def test_kill_and_resume_reproduces_the_uninterrupted_losses_bitwise(tmp_path):
    straight = pretrain("--train-iters", "6")
    first = pretrain("--train-iters", "6", "--exit-interval", "3", "--save", str(tmp_path))
    resumed = pretrain("--train-iters", "6", "--load", str(tmp_path), "--save", str(tmp_path))
    assert first["steps"] == 3 and first["checkpoint"].endswith("iter_0000003")
    assert first["lm_losses"] == straight["lm_losses"][:3]
    assert resumed["steps"] == 6
    assert resumed["lm_losses"] == straight["lm_losses"][3:]  # bitwise: same floats


@pytest.fixture(scope="module")
def one_rank_curve() -> list[float]:
    return pretrain("--train-iters", "5")["lm_losses"]


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["--expert-model-parallel-size", "2"], ["--pipeline-model-parallel-size", "2"],
                                    ["--tensor-model-parallel-size", "2"], ["--use-distributed-optimizer"]],
                         ids=["ep2", "pp2", "tp2", "dp2-distributed-optimizer"])
def test_two_rank_layouts_follow_the_one_rank_loss_curve(one_rank_curve, layout):
    parallel = pretrain("--train-iters", "5", *layout, nproc=2)
    assert len(parallel["lm_losses"]) == 5
    for one, two in zip(one_rank_curve, parallel["lm_losses"]):
        assert two == pytest.approx(one, rel=1e-4)


PP2_DP2 = ["--pipeline-model-parallel-size", "2", "--micro-batch-size", "2", "--global-batch-size", "16"]


@pytest.fixture(scope="module")
def one_f_one_b_4_ranks() -> list[float]:
    return pretrain("--train-iters", "5", *PP2_DP2, nproc=4)["lm_losses"]


@pytest.mark.slow
@pytest.mark.parametrize("schedule,extra", [("dualpipev", []), ("dualpipe", ["--calculate-per-token-loss"])],
                         ids=["dualpipev", "dualpipe-per-token-loss"])
def test_dual_schedules_follow_the_1f1b_loss_curve_on_4_ranks(one_f_one_b_4_ranks, schedule, extra):
    """PP=2 x DP=2 with DDP on two chunks per rank and the tied MTP embedding; with per-token loss the token
    count is summed over both loss stages (every token counts, so the curve is the token-mean one)."""
    dual = pretrain("--train-iters", "5", *PP2_DP2, "--pipeline-schedule", schedule, *extra,
                    nproc=4)["lm_losses"]
    assert len(dual) == 5
    for ref, got in zip(one_f_one_b_4_ranks, dual):
        assert got == pytest.approx(ref, rel=1e-4)


@pytest.mark.slow
def test_dualpipe_checkpoint_resumes_under_1f1b(one_f_one_b_4_ranks, tmp_path):
    """Checkpoint keys are global, mirror copies are replicas: a DualPipe save is an ordinary checkpoint."""
    saved = pretrain("--train-iters", "5", *PP2_DP2, "--pipeline-schedule", "dualpipe", "--exit-interval", "3",
                     "--save", str(tmp_path), nproc=4)
    resumed = pretrain("--train-iters", "5", *PP2_DP2, "--load", str(tmp_path), nproc=4)
    assert saved["steps"] == 3 and resumed["steps"] == 5
    for ref, got in zip(one_f_one_b_4_ranks[3:], resumed["lm_losses"]):
        assert got == pytest.approx(ref, rel=1e-4)


@pytest.fixture(scope="module")
def bf16_curve() -> list[float]:
    return pretrain("--train-iters", "5", "--bf16")["lm_losses"]


@pytest.mark.slow
def test_bf16_trains_close_to_fp32_from_the_same_start(one_rank_curve, bf16_curve):
    """`--bf16`: BF16 weights and compute with FP32 main weights; same initial model, so step 1 differs from
    FP32 only by BF16 rounding, and the curve keeps falling."""
    bf16 = bf16_curve
    assert bf16[0] == pytest.approx(one_rank_curve[0], rel=1e-2) and bf16[0] != one_rank_curve[0]
    assert bf16[-1] < bf16[0] - 0.3


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["1f1b", "dualpipe", "dualpipev"])
def test_bf16_pipelines_follow_the_one_rank_bf16_curve(bf16_curve, schedule):
    """`--bf16` with PP=2: activations cross stages in BF16 (pipeline_dtype follows params_dtype); the same 8
    samples a step as 4 micro-batches of 2 (DualPipeV needs 2 x PP), so only BF16 rounding differs. A dual
    chunk's Float16Module casts at its own stage's ends, not at its rank's."""
    piped = pretrain("--train-iters", "5", "--bf16", "--micro-batch-size", "2", "--pipeline-model-parallel-size", "2",
                     "--pipeline-schedule", schedule, nproc=2)["lm_losses"]
    assert piped == pytest.approx(bf16_curve, rel=1e-3)
