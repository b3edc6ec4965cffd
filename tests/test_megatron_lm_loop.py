"""Megatron-LM's own training loop (megatron.training.pretrain) runs the dsv3 model on CPU with gloo.

The oracle is dsv3-pretrain on the same flags, seed and built-in data: both build the model and optimizer
from the same Megatron-LM flags, so their per-iteration losses agree (Megatron-LM logs 7 digits).
"""
import os
import re
import subprocess
import sys

import pytest

from tests.distributed import REPO, free_port
from tests.test_pretrain_runs import COMMON, pretrain

LOOP = [a for a in COMMON if a != "--no-progress"] + ["--train-iters", "4", "--log-interval", "1",
                                                      "--num-workers", "0", "--eval-iters", "0"]


def megatron_lm(*argv: str, nproc: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m megatron_dsv3.megatron_lm` (under torchrun when nproc > 1)."""
    module = ["-m", "megatron_dsv3.megatron_lm"]
    launcher = [sys.executable] + (["-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                                    f"--master-port={free_port()}"] + module if nproc > 1 else module)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    result = subprocess.run(launcher + list(argv), capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def logged(result: subprocess.CompletedProcess, key: str) -> list[float]:
    """Per-iteration values of `key` in Megatron-LM's iteration lines (log interval 1). Megatron-LM resets its
    running sums only from the second log on, so the second line is the mean of iterations 1 and 2."""
    values = [float(v) for v in re.findall(rf"\| {re.escape(key)}: ([0-9.E+-]+) \|", result.stdout)]
    if len(values) >= 2:
        values[1] = 2 * values[1] - values[0]
    return values


@pytest.fixture(scope="module")
def reference() -> list[float]:
    return pretrain("--train-iters", "4")["lm_losses"]


@pytest.mark.slow
@pytest.mark.parametrize("layout,nproc", [([], 1), (["--pipeline-model-parallel-size", "2"], 2),
                                          (["--expert-model-parallel-size", "2"], 2)], ids=["one", "pp2", "ep2"])
def test_megatron_lm_loop_matches_dsv3_pretrain(reference, tmp_path, layout, nproc):
    extra = ["--save", str(tmp_path / "ckpt"), "--save-interval", "4"] if nproc == 1 else []
    result = megatron_lm(*LOOP, *layout, *extra, nproc=nproc)
    losses = logged(result, "lm loss")
    assert len(losses) == 4
    for want, got in zip(reference, losses):
        assert got == pytest.approx(want, abs=1e-5)
    # The balance loss the model trains with, the MTP loss and the paper's MaxVio per MoE layer are reported.
    assert len(logged(result, "seq_load_balancing_loss")) == 4 and "| load_balancing_loss:" not in result.stdout
    assert all(v > 0 for v in logged(result, "mtp_1 loss"))
    maxvio = re.findall(r"\[moe\] iteration +\d+ \| maxvio mean ([0-9.]+) \| max [0-9.]+ \| layer_01=", result.stdout)
    assert len(maxvio) == 4
    if extra:
        assert (tmp_path / "ckpt" / "iter_0000004").is_dir()


@pytest.mark.parametrize("argv,message", [
    (["--normalization", "LayerNorm"], "--normalization: not supported by the dsv3 spec"),
    (["--lr-warmup-iters", "4"], "--lr-warmup-iters: 4 warm-up steps must be fewer than the 4 decay steps")])
def test_megatron_lm_refuses_a_flag_the_spec_cannot_honour_in_one_line(capsys, monkeypatch, runtime, argv, message):
    from megatron_dsv3 import megatron_lm

    monkeypatch.setattr(sys, "argv", ["megatron_lm", *LOOP, *argv])
    monkeypatch.setattr(megatron_lm, "_PARSER", {})
    with pytest.raises(SystemExit) as exc:
        megatron_lm.main()
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"megatron_dsv3.megatron_lm: error: {message}"), err[-1]
    assert not any("Traceback" in line for line in err)


@pytest.mark.parametrize("entry", ["megatron_lm", "dsv3-pretrain"])
def test_help_exits_0(capsys, monkeypatch, entry):
    """`--help` prints Megatron-LM's flags and ours (megatron-core 0.19's help text has a bare `%`)."""
    from megatron_dsv3 import megatron_lm
    from megatron_dsv3.training.pretrain import main

    monkeypatch.setattr(sys, "argv", ["prog", "--help"])
    monkeypatch.setattr(megatron_lm, "_PARSER", {})
    with pytest.raises(SystemExit) as exc:
        megatron_lm.parse_args() if entry == "megatron_lm" else main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--moe-paged-stash-buffer-size-factor-cuda" in out and "--preset" in out


@pytest.fixture(scope="module")
def one_rank_bf16() -> subprocess.CompletedProcess:
    return megatron_lm(*LOOP, "--bf16", "--micro-batch-size", "2")


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["dualpipe", "dualpipev"])
def test_megatron_lm_loop_logs_the_one_rank_losses_under_bf16_dual_pipelines(one_rank_bf16, schedule):
    """`--bf16` with DualPipe(V) in Megatron-LM's loop: activations cross stages in BF16, and the LM and MTP
    losses, computed on the first rank or on both ends, reach the last rank's log as one rank logs them."""
    piped = megatron_lm(*LOOP, "--bf16", "--micro-batch-size", "2", "--pipeline-model-parallel-size", "2",
                        "--pipeline-schedule", schedule, nproc=2)
    for key in ("lm loss", "mtp_1 loss"):
        want, got = logged(one_rank_bf16, key), logged(piped, key)
        assert len(got) == 4 and got == pytest.approx(want, rel=1e-4), key
