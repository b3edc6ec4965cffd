"""dsv3-pretrain's command line: Megatron-LM's real parser, presets and explicit flags, one-line errors."""
import subprocess
import sys

import pytest
import torch

import megatron_dsv3 as m
from megatron_dsv3.config import YarnConfig
from megatron_dsv3.cli.model_config import config_from_args
from megatron_dsv3.cli.parser import parse_megatron_args
from megatron_dsv3.model.init import init_layout_independent
from megatron_dsv3.training.pretrain import main
from tests.distributed import REPO

TINY_AS_FLAGS = [
    "--model-spec", "dsv3", "--vocab-size", "512", "--hidden-size", "64", "--ffn-hidden-size", "160",
    "--num-layers", "4", "--num-attention-heads", "4", "--multi-latent-attention", "--q-lora-rank", "32",
    "--kv-lora-rank", "32", "--qk-head-dim", "16", "--qk-pos-emb-head-dim", "8", "--v-head-dim", "16",
    "--num-experts", "8", "--moe-ffn-hidden-size", "32", "--moe-shared-expert-intermediate-size", "32",
    "--moe-router-topk", "2", "--moe-router-num-groups", "4", "--moe-router-group-topk", "2",
    "--moe-router-topk-scaling-factor", "2.5", "--moe-router-score-function", "sigmoid",
    "--moe-router-enable-expert-bias", "--moe-router-bias-update-rate", "1e-3",
    "--moe-router-load-balancing-type", "seq_aux_loss", "--moe-aux-loss-coeff", "1e-4",
    "--moe-layer-freq", "([0]*1+[1]*3)", "--mtp-num-layers", "1", "--mtp-loss-scaling-factor", "0.1",
    "--rope-type", "yarn", "--rotary-base", "10000", "--rotary-scaling-factor", "4",
    "--original-max-position-embeddings", "256", "--mscale", "1.0", "--mscale-all-dim", "1.0",
    "--beta-fast", "32", "--beta-slow", "1", "--norm-epsilon", "1e-6", "--max-position-embeddings", "1024",
    "--init-method-std", "0.02", "--untie-embeddings-and-output-weights",
    "--seq-length", "64", "--micro-batch-size", "2", "--train-iters", "10", "--lr", "1e-3",
]


def _config(argv):
    args, explicit = parse_megatron_args(argv)
    return config_from_args(args, explicit)


def test_megatron_parser_accepts_deepseek_flags_and_builds_the_preset(runtime):
    cfg = _config(TINY_AS_FLAGS)
    assert cfg == m.presets.get_preset("tiny")
    preset_model, flag_model = m.build_model(m.presets.get_preset("tiny")), m.build_model(cfg)
    init_layout_independent(preset_model, 7)
    init_layout_independent(flag_model, 7)
    a, b = preset_model.state_dict(), flag_model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))


def test_explicit_flags_override_the_preset_and_defaults_do_not():
    cfg = _config(["--preset", "tiny", "--num-experts", "16", "--moe-router-topk", "4", "--seq-length", "8"])
    tiny = m.presets.get_preset("tiny")
    assert (cfg.n_routed_experts, cfg.num_experts_per_tok) == (16, 4)
    assert cfg.replace(n_routed_experts=8, num_experts_per_tok=2) == tiny  # nothing else moved
    assert _config(["--preset", "v2-lite", "--rope-type", "rope"]).rope_scaling is None
    assert _config(["--preset", "tiny", "--rotary-scaling-factor", "8"]).rope_scaling == YarnConfig(
        factor=8.0, original_max_position_embeddings=256)
    assert _config(["--preset", "tiny", "--num-layers", "2"]).first_k_dense_replace == 1
    assert _config(["--preset", "tiny", "--moe-aux-loss-coeff", "0.001"]).seq_aux_alpha == pytest.approx(1e-3)


BAD = [
    (["--preset", "huge"], "--preset: unknown preset 'huge'"),
    (["--preset", "tiny", "--tensor-model-parallel-size", "3"], "--num-attention-heads"),
    (["--preset", "tiny", "--seq-length", "32"], "--train-iters: required"),
    (["--preset", "tiny", "--train-iters", "2"], "--seq-length: required"),
    (["--preset", "tiny", "--num-experts", "6"], "--moe-router-num-groups"),
    (["--preset", "tiny", "--moe-layer-freq", "[1,0,1,1]"], "--moe-layer-freq"),
    (["--preset", "tiny", "--moe-router-topk", "7"], "--moe-router-topk"),
    (["--preset", "tiny", "--model-spec", "gpt"], "--model-spec: unknown spec 'gpt'"),
    (["--preset", "tiny", "--train-iters", "2", "--seq-length", "8", "--global-batch-size", "3",
      "--micro-batch-size", "2"], "--global-batch-size"),
    (["--preset", "tiny", "--train-iters", "2", "--seq-length", "8", "--lr", "-1"], "--lr: must be > 0"),
    (["--preset", "tiny", "--train-iters", "2", "--seq-length", "8", "--save-interval", "5"], "--save-interval"),
    (["--preset", "tiny", "--train-iters", "2", "--seq-length", "8", "--vocab-size", "100"], "--vocab-size"),
    (["--preset", "tiny", "--train-iters", "2", "--seq-length", "8", "--tokenizer-type", "GPT2BPETokenizer"],
     "--tokenizer-type"),
    (["--preset", "tiny", "--train-iters", "2", "--seq-length", "8", "--data-path", "/nonexistent/corpus"],
     "--data-path"),
    (["--preset", "tiny", "--train-iters", "2", "--seq-length", "100000"], "--seq-length"),
    (["--preset", "tiny", "--rotary-scaling-factor", "-2", "--train-iters", "2", "--seq-length", "8"],
     "--rotary-scaling-factor"),
    (["--preset", "tiny", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--preset", "tiny", "--train-iters", "5", "--seq-length", "8", "--lr-warmup-iters", "20"],
     "--lr-warmup-iters"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[b[1].split(":")[0].strip("-") + str(i) for i, b in enumerate(BAD)])
def test_bad_cli_input_is_one_line_and_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1]
    assert not any("Traceback" in line for line in err)


def test_console_script_reports_without_traceback():
    result = subprocess.run([sys.executable, "-m", "megatron_dsv3.training.pretrain", "--preset", "tiny",
                             "--train-iters", "2", "--seq-length", "16", "--load", "/nonexistent/ckpt"],
                            capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("dsv3-pretrain: error: --load: ")


SCHEDULE_BAD = [
    (1, ["--pipeline-schedule", "dualpipe"], "--pipeline-schedule dualpipe: needs --pipeline-model-parallel-size >= 2"),
    (3, ["--pipeline-schedule", "dualpipe", "--pipeline-model-parallel-size", "3", "--num-layers", "6"],
     "DualPipe needs an even number of ranks"),
    (2, ["--pipeline-schedule", "dualpipev", "--pipeline-model-parallel-size", "2", "--global-batch-size", "4"],
     "micro-batches: DualPipeV needs at least 2 x pipeline ranks = 4"),
    (4, ["--pipeline-schedule", "dualpipev", "--pipeline-model-parallel-size", "4", "--global-batch-size", "16"],
     "--pipeline-schedule dualpipev: 8 pipeline stages"),
    (2, ["--pipeline-schedule", "zb", "--pipeline-model-parallel-size", "2"], "--pipeline-schedule: invalid choice"),
]


@pytest.mark.parametrize("world,argv,message", SCHEDULE_BAD, ids=[str(i) for i in range(len(SCHEDULE_BAD))])
def test_bad_pipeline_schedule_settings_are_one_line_errors(capsys, monkeypatch, world, argv, message):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(SystemExit) as exc:
        main(["--preset", "tiny", "--train-iters", "2", "--seq-length", "8", "--micro-batch-size", "2", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1], err[-1]
    assert not any("Traceback" in line for line in err)
