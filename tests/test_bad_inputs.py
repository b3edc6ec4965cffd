"""Bad input, table-driven: every case ends in one line naming the flag, field or path, never a traceback.

Command lines run in-process up to the point where they fail (before any training), the Python API through
`DSV3Config`, `get_preset` and `config_from_hf`.
"""
import math

import pytest

from megatron_dsv3.checkpoint.hf import config_from_hf
from megatron_dsv3.config import DSV3Config, YarnConfig
from megatron_dsv3.presets import get_preset

BASE = ["--preset", "tiny", "--train-iters", "2", "--seq-length", "16", "--micro-batch-size", "2"]

PRETRAIN = [
    (["--micro-batch-size", "0"], "--micro-batch-size"), (["--micro-batch-size", "-1"], "--micro-batch-size"),
    (["--global-batch-size", "0"], "--global-batch-size"), (["--global-batch-size", "3"], "--global-batch-size"),
    (["--lr", "nan"], "--lr"), (["--lr", "inf"], "--lr"), (["--lr", "-1"], "--lr"), (["--lr", "0"], "--lr"),
    (["--min-lr", "-1"], "--min-lr"), (["--min-lr", "nan"], "--min-lr"), (["--weight-decay", "-0.1"], "--weight-decay"),
    (["--weight-decay", "nan"], "--weight-decay"), (["--clip-grad", "-1"], "--clip-grad"),
    (["--adam-beta1", "1.5"], "--adam-beta1"), (["--adam-beta2", "-0.1"], "--adam-beta2"),
    (["--adam-eps", "-1"], "--adam-eps"), (["--hidden-dropout", "1.5"], "--hidden-dropout"),
    (["--attention-dropout", "-0.1"], "--attention-dropout"), (["--train-iters", "0"], "--train-iters"),
    (["--train-iters", "-5"], "--train-iters"), (["--train-iters", "x"], "--train-iters"),
    (["--seq-length", "0"], "--seq-length"), (["--seq-length", "100000"], "--seq-length"),
    (["--num-layers", "0"], "--num-layers"), (["--num-layers", "x"], "--num-layers"),
    (["--hidden-size", "0"], "--hidden-size"), (["--num-attention-heads", "0"], "--num-attention-heads"),
    (["--num-experts", "6"], "--moe-router-num-groups"), (["--num-experts", "-1"], "--num-experts"),
    (["--moe-router-topk", "0"], "--moe-router-topk"), (["--moe-router-topk", "99"], "--moe-router-topk"),
    (["--moe-router-num-groups", "3"], "--moe-router-num-groups"),
    (["--moe-router-group-topk", "9"], "--moe-router-group-topk"),
    (["--moe-router-topk-scaling-factor", "nan"], "--moe-router-topk-scaling-factor"),
    (["--moe-router-topk-scaling-factor", "0"], "--moe-router-topk-scaling-factor"),
    (["--moe-router-bias-update-rate", "-1"], "--moe-router-bias-update-rate"),
    (["--moe-router-bias-update-rate", "nan"], "--moe-router-bias-update-rate"),
    (["--moe-aux-loss-coeff", "-1"], "--moe-aux-loss-coeff"), (["--mtp-num-layers", "-1"], "--mtp-num-layers"),
    (["--mtp-loss-scaling-factor", "nan"], "--mtp-loss-scaling-factor"),
    (["--q-lora-rank", "0"], "--q-lora-rank"), (["--kv-lora-rank", "0"], "--kv-lora-rank"),
    (["--qk-pos-emb-head-dim", "7"], "--qk-pos-emb-head-dim"), (["--rotary-base", "0"], "--rotary-base"),
    (["--rotary-base", "nan"], "--rotary-base"), (["--norm-epsilon", "0"], "--norm-epsilon"),
    (["--norm-epsilon", "nan"], "--norm-epsilon"), (["--max-position-embeddings", "0"], "--max-position-embeddings"),
    (["--init-method-std", "0"], "--init-method-std"), (["--init-method-std", "nan"], "--init-method-std"),
    (["--vocab-size", "100"], "--vocab-size"), (["--rotary-scaling-factor", "-2"], "--rotary-scaling-factor"),
    (["--rotary-scaling-factor", "nan"], "--rotary-scaling-factor"), (["--mscale", "-1"], "--mscale"),
    (["--beta-fast", "0"], "--beta-fast"),
    (["--original-max-position-embeddings", "0"], "--original-max-position-embeddings"),
    (["--tensor-model-parallel-size", "3"], "--num-attention-heads"),
    (["--tensor-model-parallel-size", "0"], "--tensor-model-parallel-size"),
    (["--pipeline-model-parallel-size", "0"], "--pipeline-model-parallel-size"),
    (["--expert-model-parallel-size", "3"], "expert_model_parallel_size=3"),
    (["--pipeline-schedule", "zb"], "--pipeline-schedule"), (["--save-interval", "5"], "--save-interval"),
    (["--save", "/proc/dsv3/x"], "--save"), (["--eval-interval", "0"], "--eval-interval"),
    (["--log-interval", "0"], "--log-interval"), (["--exit-interval", "0"], "--exit-interval"),
    (["--lr-warmup-iters", "-1"], "--lr-warmup-iters"), (["--lr-warmup-iters", "2"], "--lr-warmup-iters"),
    (["--lr-decay-style", "bogus"], "--lr-decay-style"), (["--tokenizer-type", "GPT2BPETokenizer"], "--tokenizer-type"),
    (["--tokenizer-type", "HuggingFaceTokenizer"], "--tokenizer-model"), (["--data-path", "/nonexistent/x"], "--data-path"),
    (["--load", "/nonexistent/ckpt"], "--load"), (["--fp8-recipe", "tensorwise"], "--fp8-recipe"),
    (["--fp8-recipe", "blockwise", "--fp8-format", "hybrid"], "--fp8-format"),
    (["--fp8-no-scaling-control"], "--fp8-no-scaling-control"), (["--normalization", "LayerNorm"], "--normalization"),
    (["--kv-channels", "32"], "--kv-channels"), (["--moe-token-dispatcher-type", "flex"], "--moe-token-dispatcher-type"),
    (["--use-precision-aware-optimizer"], "--use-precision-aware-optimizer"),
    (["--sequence-parallel"], "--sequence-parallel"), (["--context-parallel-size", "2"], "--context-parallel-size"),
    (["--moe-layer-freq", "[1,0,1,1]"], "--moe-layer-freq"), (["--model-spec", "gpt"], "--model-spec"),
    (["--preset", "huge"], "--preset"), (["--no-such-flag"], "--no-such-flag"), (["--seed", "0"], "--seed"),
    (["--seed", "-1"], "--seed"), (["--moe-expert-capacity-factor", "-1"], "--moe-expert-capacity-factor"),
    (["--moe-z-loss-coeff", "nan"], "--moe-z-loss-coeff"), (["--dsv3-backend", "te"], "--dsv3-backend te"),
    (["--transformer-impl", "inference_optimized"], "--transformer-impl"),
]


def _one_line(capsys, prog: str, run, needle: str) -> None:
    with pytest.raises(SystemExit) as exc:
        run()
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and not any("Traceback" in line for line in err)
    assert len(err) == 1 and err[0].startswith(f"{prog}: error: ") and needle in err[0], err


@pytest.mark.parametrize("argv,needle", PRETRAIN, ids=[" ".join(a) for a, _ in PRETRAIN])
def test_pretrain_bad_input(capsys, runtime, argv, needle):
    from megatron_dsv3.training.pretrain import main

    _one_line(capsys, "dsv3-pretrain", lambda: main(BASE + argv), needle)


GENERATE = [
    ([], "--load"), (["--load", "/tmp"], "--prompt"), (["--load", "/tmp", "--prompt", "x", "--max-new-tokens", "0"],
                                                       "--max-new-tokens"),
    (["--load", "/tmp", "--prompt", "x", "--top-k", "-1"], "--top-k"),
    (["--load", "/tmp", "--prompt", "x", "--top-p", "0"], "--top-p"),
    (["--load", "/tmp", "--prompt", "x", "--temperature", "nan"], "--temperature"),
    (["--load", "/tmp", "--prompt", "x", "--temperature", "0.5", "--speculative"], "--speculative"),
    (["--load", "/tmp", "--prompt", "x", "--draft-tokens", "2"], "--draft-tokens"),
    (["--load", "/tmp", "--prompt", "x", "--speculative", "--draft-tokens", "0"], "--draft-tokens"),
    (["--load", "/tmp", "--prompt", "x" * 1100], "--max-new-tokens"),
    (["--load", "/tmp", "--prompt", "x", "--capacity", "2"], "--capacity"),
    (["--load", "/nonexistent", "--prompt", "x"], "--load"),
]


@pytest.mark.parametrize("argv,needle", GENERATE, ids=[str(i) for i in range(len(GENERATE))])
def test_generate_bad_input(capsys, runtime, argv, needle):
    from megatron_dsv3.inference.cli import main

    _one_line(capsys, "dsv3-generate", lambda: main(["--preset", "tiny", *argv]), needle)


CONVERT = [
    (["hf-to-mcore", "--input", "/nonexistent", "--output", "/tmp/x"], "/nonexistent"),
    (["mcore-to-hf", "--input", "/nonexistent", "--output", "/tmp/x"], "/nonexistent"),
]


@pytest.mark.parametrize("argv,needle", CONVERT + [("symlink", "is a symbolic link"), ("weight_map", "outside --input")],
                         ids=["hf-to-mcore", "mcore-to-hf", "output-symlink", "index-escapes-input"])
def test_convert_bad_input(capsys, tmp_path, argv, needle):
    import json

    from megatron_dsv3.checkpoint.convert import main

    if argv in ("symlink", "weight_map"):  # an input folder that passes the first checks
        (tmp_path / "hf").mkdir()
        tiny = {k: v for k, v in get_preset("tiny").__dict__.items() if k != "rope_scaling"}
        (tmp_path / "hf" / "config.json").write_text(json.dumps({**tiny, "hidden_act": "silu"}))
        (tmp_path / "hf" / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {"model.embed_tokens.weight": "../../etc/passwd"}}))
        (tmp_path / "real").mkdir()
        (tmp_path / "link").symlink_to(tmp_path / "real")
        out = tmp_path / ("link" if argv == "symlink" else "out")
        argv = ["hf-to-mcore", "--input", str(tmp_path / "hf"), "--output", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dsv3-convert: error: ") and needle in err[0], err


API = [
    (dict(rms_norm_eps=None), "rms_norm_eps"), (dict(n_routed_experts="8"), "n_routed_experts"),
    (dict(rms_norm_eps=math.nan), "rms_norm_eps"), (dict(rope_theta=math.inf), "rope_theta"),
    (dict(bias_update_speed=math.nan), "bias_update_speed"), (dict(routed_scaling_factor=math.nan), "routed_scaling_factor"),
    (dict(num_nextn_predict_layers=1.5), "num_nextn_predict_layers"), (dict(num_hidden_layers=True), "num_hidden_layers"),
    (dict(norm_topk_prob=1), "norm_topk_prob"), (dict(hidden_size=0), "hidden_size"), (dict(hidden_size=-64), "hidden_size"),
    (dict(vocab_size=1.0), "vocab_size"), (dict(scoring_func="relu"), "scoring_func"), (dict(topk_method="x"), "topk_method"),
    (dict(q_lora_rank=0), "q_lora_rank"), (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
    (dict(first_k_dense_replace=99), "first_k_dense_replace"), (dict(n_group=3), "n_group"),
    (dict(topk_group=0), "topk_group"), (dict(num_experts_per_tok=0), "num_experts_per_tok"),
    (dict(mtp_loss_weight=-1.0), "mtp_loss_weight"), (dict(seq_aux_alpha=math.inf), "seq_aux_alpha"),
    (dict(initializer_range=0.0), "initializer_range"), (dict(tensor_model_parallel_size=3), "num_attention_heads"),
    (dict(rope_scaling="yarn"), "rope_scaling"), (dict(rope_scaling=YarnConfig(factor=math.nan)), "rope_scaling.factor"),
    (dict(rope_scaling=YarnConfig(beta_fast=0.0)), "rope_scaling.beta_fast"),
    (dict(rope_scaling=YarnConfig(original_max_position_embeddings=2.5)), "rope_scaling.original_max_position_embeddings"),
    (dict(expert_model_parallel_size=0), "expert_model_parallel_size"),
]


@pytest.mark.parametrize("changes,field", API, ids=[f for _, f in API])
def test_config_refuses_with_the_field_name(changes, field):
    with pytest.raises(ValueError, match=rf"^DSV3Config\.{field}: "):
        DSV3Config(**changes)


@pytest.mark.parametrize("name", [None, 3, ["tiny"], "huge"])
def test_get_preset_refuses_what_is_not_a_preset_name(name):
    with pytest.raises(ValueError, match="--preset: unknown preset"):
        get_preset(name)


@pytest.mark.parametrize("changes,field", [({"rope_scaling": "yarn"}, "rope_scaling"),
                                           ({"rms_norm_eps": None}, "rms_norm_eps"),
                                           ({"routed_scaling_factor": "x"}, "routed_scaling_factor"),
                                           ({"topk_method": "sinkhorn"}, "topk_method"),
                                           ({"hidden_act": "gelu"}, "hidden_act")])
def test_config_from_hf_refuses_with_the_field_name(changes, field):
    base = {k: v for k, v in DSV3Config().__dict__.items() if k != "rope_scaling"}
    with pytest.raises(ValueError, match=field):
        config_from_hf({**base, **changes})
