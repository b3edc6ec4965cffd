"""Megatron-LM integration: providers for megatron.training.pretrain, launch scripts and the pretrain_gpt patch."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import megatron_dsv3 as m
from megatron_dsv3 import megatron_lm as mlm
from megatron_dsv3.moe.balancing import biased_routers
from megatron_dsv3.presets import get_preset
from megatron_dsv3.model.init import init_layout_independent

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
PATCH = REPO / "patches" / "megatron-lm-core_r0.19.0-pretrain_gpt.patch"


def _other_provider(parser):
    parser.add_argument("--my-own-flag", type=int, default=0)
    return parser


def _parse(monkeypatch, argv, existing=_other_provider):
    """Parse and validate as a patched pretrain_gpt.py does (without Megatron-LM's process-global state)."""
    from megatron.training.arguments import parse_args

    from megatron_dsv3.cli.parser import validate_megatron_args

    required = [] if "--micro-batch-size" in argv else ["--micro-batch-size", "2", "--seq-length", "16"]
    monkeypatch.setattr(sys, "argv", ["pretrain_gpt.py", *argv, *required])
    monkeypatch.setattr(mlm, "_PARSER", {})
    args = parse_args(mlm.chained_extra_args_provider(existing))
    if mlm.is_dsv3_requested(args):
        validate_megatron_args(args)
    return args


def test_megatron_parser_accepts_plugin_deepseek_and_existing_flags(monkeypatch):
    args = _parse(monkeypatch, ["--model-spec", "dsv3", "--preset", "tiny", "--my-own-flag", "7",
                                "--num-experts", "16", "--moe-router-topk", "4", "--q-lora-rank", "48",
                                "--moe-router-score-function", "sigmoid", "--dsv3-backend", "local"])
    assert (args.model_spec, args.preset, args.my_own_flag, args.dsv3_backend) == ("dsv3", "tiny", 7, "local")
    assert (args.num_experts, args.moe_router_topk, args.q_lora_rank) == (16, 4, 48)
    tiny = m.presets.get_preset("tiny")
    assert (args.num_layers, args.hidden_size, args.kv_lora_rank) == (4, 64, 32)  # preset shape as defaults
    assert args.moe_layer_freq == [0] * tiny.first_k_dense_replace + [1] * 3
    assert mlm.is_dsv3_requested(args)
    assert not mlm.is_dsv3_requested(_parse(monkeypatch, ["--num-layers", "2"], existing=None))


def test_config_is_the_preset_with_explicit_overrides(monkeypatch):
    args = _parse(monkeypatch, ["--preset", "tiny", "--num-experts", "16", "--moe-router-topk", "4",
                                "--num-layers", "3", "--seq-length", "8"])
    cfg = mlm.dsv3_config_from_megatron_args(args)
    tiny = m.presets.get_preset("tiny")
    assert cfg == tiny.replace(n_routed_experts=16, num_experts_per_tok=4, num_hidden_layers=3)
    assert mlm.dsv3_config_from_megatron_args(_parse(monkeypatch, ["--preset", "tiny"])) == tiny


@pytest.fixture
def megatron_args(monkeypatch, runtime):
    from megatron.training import get_args, global_vars

    args = _parse(monkeypatch, ["--model-spec", "dsv3", "--preset", "tiny", "--transformer-impl", "local",
                                "--seq-length", "16", "--micro-batch-size", "2"])
    saved = global_vars._GLOBAL_ARGS
    global_vars.set_args(args)
    assert get_args() is args
    yield args
    global_vars._GLOBAL_ARGS = saved


def test_model_provider_builds_the_preset_shapes(megatron_args):
    model = mlm.model_provider(pre_process=True, post_process=True)
    reference = m.build_model(m.presets.get_preset("tiny"), backend="local")
    assert type(model).__name__ == "GPTModel"
    got = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert got == {n: tuple(p.shape) for n, p in reference.named_parameters()}


def _batch(cfg, b=2, s=16):
    ids = torch.randint(0, cfg.vocab_size, (b, s + 1))
    return {"tokens": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": torch.ones(b, s),
            "position_ids": torch.arange(s).expand(b, s), "attention_mask": None}


def test_forward_step_loss_contract(megatron_args):
    model = mlm.model_provider()
    output, loss_fn = mlm.forward_step(iter([_batch(model.dsv3_config)]), model)
    result = loss_fn(output)
    assert len(result) == 3
    loss, num_tokens, report = result
    assert int(num_tokens) == 32 and torch.isfinite(loss) and loss > 0
    assert torch.allclose(report["lm loss"], torch.stack([loss.detach(), num_tokens.float()]))


def test_wrap_finalize_model_grads_sees_loads_before_reset(megatron_args):
    model = mlm.model_provider()
    output, loss_fn = mlm.forward_step(iter([_batch(model.dsv3_config)]), model)
    loss_fn(output)[0].backward()
    routers = biased_routers([model])
    assert routers and all(r.local_tokens_per_expert.sum() > 0 for r in routers)
    seen, order = [], []

    def fake_finalize(chunks, num_tokens=None, **kwargs):
        order.append("finalize")
        for r in biased_routers(chunks):
            r.local_tokens_per_expert.zero_()

    def on_loads(metrics):
        order.append("loads")
        seen.append({k: v.clone() for k, v in metrics["tokens_per_expert"].items()})

    mlm.wrap_finalize_model_grads(fake_finalize, on_loads)([model], None)
    assert order == ["loads", "finalize"]
    cfg = model.dsv3_config
    expected_layers = cfg.num_hidden_layers - cfg.first_k_dense_replace + cfg.num_nextn_predict_layers
    assert len(seen[0]) == expected_layers
    assert all(v.sum() == 2 * 16 * cfg.num_experts_per_tok for v in seen[0].values())
    assert all(r.local_tokens_per_expert.sum() == 0 for r in routers)
    scalars = mlm.moe_metrics_for_logging([model])["scalars"]
    assert "moe/layer_01/bias_mean" in scalars


@pytest.mark.parametrize("script", sorted((REPO / "examples").glob("*.sh")), ids=lambda p: p.name)
def test_launch_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    assert "set -euo pipefail" in script.read_text()


def test_launch_scripts_exist():
    names = {p.name for p in (REPO / "examples").glob("*.sh")}
    assert {"train_tiny_cpu.sh", "train_v2_lite_8gpu.sh", "train_v3_671b.sh"} <= names


def _hunks(text):
    """(old_count, new_count, counted_old, counted_new) for every hunk of a unified diff."""
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        head = re.match(r"@@ -\d+(?:,(\d+))? \+\d+(?:,(\d+))? @@", lines[i])
        i += 1
        if not head:
            continue
        want_old, want_new = int(head.group(1) or 1), int(head.group(2) or 1)
        old = new = 0
        while i < len(lines) and (old < want_old or new < want_new):
            tag = lines[i][:1]
            if tag not in " -+\\":
                break
            old += tag in " -"
            new += tag in " +"
            i += 1
        out.append((want_old, want_new, old, new))
    return out


def test_patch_is_a_valid_unified_diff():
    text = PATCH.read_text()
    assert "megatron_dsv3.megatron_lm" in text and "core_r0.19.0" in text
    assert re.search(r"^--- a/pretrain_gpt\.py$", text, re.M)
    assert re.search(r"^\+\+\+ b/pretrain_gpt\.py$", text, re.M)
    hunks = _hunks(text)
    assert hunks and all(want_old == old and want_new == new for want_old, want_new, old, new in hunks)
    assert _hunks("@@ -1,2 +1,2 @@\n a\n-b\n") != [(2, 2, 2, 2)]  # the checker itself rejects a short hunk


def test_patch_applies_to_its_own_context(tmp_path):
    text = PATCH.read_text()
    body = text.split("@@ if __name__ == \"__main__\":\n", 1)[1].splitlines()
    old = [line[1:] for line in body if line[:1] in " -"]
    filler = "".join(f"x{i} = {i}\n" for i in range(700))  # shifted: git apply must find the hunk by context
    (tmp_path / "pretrain_gpt.py").write_text(filler + 'if __name__ == "__main__":\n' + "\n".join(old) + "\n")
    run = subprocess.run(["git", "apply", str(PATCH)], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    patched = (tmp_path / "pretrain_gpt.py").read_text()
    compile(patched, "pretrain_gpt.py", "exec")
    assert "chained_extra_args_provider(" in patched and "model_provider=dsv3_megatron_lm.model_provider" in patched


def _script_arguments(script: Path) -> list[str]:
    """The flags a launch script passes to the trainer, captured by shadowing `exec` with a printer."""
    env = dict(os.environ, MASTER_ADDR="n0", NNODES="256", NODE_RANK="0", DATA_PATH="/data/x",
               TOKENIZER_MODEL="tok", RUN_DIR="/tmp/run")
    out = subprocess.run(["bash", "-c", 'exec() { printf "%s\\0" "$@"; }; source "$0"', str(script)],
                         capture_output=True, text=True, env=env, check=True).stdout.split("\0")[:-1]
    for marker in ("megatron_dsv3.megatron_lm", "megatron_dsv3.training.pretrain", "dsv3-pretrain"):
        if marker in out:
            return out[out.index(marker) + 1:]
    raise AssertionError(f"{script}: no trainer invocation in {out}")


@pytest.mark.parametrize("script,preset,pp", [("train_tiny_cpu.sh", "tiny", 1),
                                              ("train_v2_lite_8gpu.sh", "v2-lite", 1),
                                              ("train_v3_671b.sh", "v3-671b", 16)])
def test_launch_script_flags_give_a_valid_config(script, preset, pp):
    from megatron_dsv3.cli.model_config import config_from_args
    from megatron_dsv3.cli.parser import parse_megatron_args

    args, explicit = parse_megatron_args(_script_arguments(EXAMPLES / script))
    cfg = config_from_args(args, explicit)
    assert cfg.pipeline_model_parallel_size == pp
    layout = dict(pipeline_model_parallel_size=1, expert_model_parallel_size=1, first_pipeline_stage_layers=None,
                  last_pipeline_stage_layers=None)
    if preset == "v3-671b":
        layout["mtp_loss_weight"] = 0.1  # the recipe's 0.3 for the first 10T tokens
    assert cfg.replace(**layout) == get_preset(preset)


def test_dualpipev_provider_and_schedule_reach_megatron_training(megatron_args, monkeypatch):
    """`--pipeline-schedule dualpipev`: the provider returns the rank's two V chunks (a list, which
    megatron.training's get_model wraps chunk by chunk) and Megatron-LM's train loop gets the DualPipeV
    function; on one rank the V runs both chunks, and its losses equal megatron-core's no-pipelining run."""
    import megatron.training.training as megatron_training
    from megatron.core.pipeline_parallel import schedules

    monkeypatch.setattr(megatron_training, "get_forward_backward_func", megatron_training.get_forward_backward_func)
    monkeypatch.setattr(megatron_args, "pipeline_schedule", "dualpipev")
    from megatron.core import parallel_state

    chunks = mlm.model_provider(pre_process=True, post_process=True)
    assert isinstance(chunks, list) and [c.dsv3_stage for c in chunks] == [(0, 2), (1, 2)]
    # Megatron-LM's training_log reduces MoE metrics over model.pg_collection.pp: the real pipeline group
    assert all(c.pg_collection.pp is parallel_state.get_pipeline_model_parallel_group() for c in chunks)
    chunks.model_type = "set by get_model"  # megatron.training does this to whatever the provider returns
    forward_backward = megatron_training.get_forward_backward_func(schedule_pg_collection=None)
    cfg = get_preset("tiny")
    torch.manual_seed(0)
    data = [_batch(cfg) for _ in range(4)]
    kwargs = dict(forward_step_func=mlm.forward_step, num_microbatches=4, seq_length=16, micro_batch_size=2,
                  decoder_seq_length=16, forward_only=True)
    dual = forward_backward(data_iterator=iter(data), model=list(chunks), **kwargs)
    reference = m.build_model(cfg, backend="local")
    init_layout_independent(reference, megatron_args.seed)
    plain = schedules.forward_backward_no_pipelining(data_iterator=iter(data), model=[reference], **kwargs)
    assert len(dual) == 4
    for got, want in zip(dual, plain):
        assert torch.allclose(got["lm loss"], want["lm loss"], rtol=1e-6)
