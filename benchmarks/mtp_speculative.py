"""MTP speculative decoding vs plain greedy decoding, side by side, on a `make run` model.

    python benchmarks/mtp_speculative.py                   # newest runs/tiny-*/checkpoints
    python benchmarks/mtp_speculative.py --load CKPT_DIR --prompts 8 --new-tokens 64

With no --load and no runs/tiny-*/checkpoints, it first trains one with examples/train_tiny_cpu.sh
(--train-iters from --train-iters-if-missing) and says so. Prompts are byte slices of the built-in corpus.
Both decoders run on every prompt (one warm-up first); the outputs must be identical. Ends with one JSON line:
acceptance_rate, tokens_per_main_step (speculative and plain) and their ratio, wall-clock tokens/s of both.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def newest_checkpoint() -> Path | None:
    found = sorted((p for p in (REPO / "runs").glob("tiny-*/checkpoints")
                    if (p / "latest_checkpointed_iteration.txt").is_file()), key=lambda p: p.parent.name)
    return found[-1] if found else None


def train_one(iters: int) -> Path:
    print(f"no runs/tiny-*/checkpoints found: training one with examples/train_tiny_cpu.sh --train-iters {iters}",
          file=sys.stderr)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    subprocess.run(["bash", "examples/train_tiny_cpu.sh", "--train-iters", str(iters), "--save-interval", str(iters),
                    "--no-progress"], cwd=REPO, env=env, check=True, stdout=sys.stderr)
    ckpt = newest_checkpoint()
    if ckpt is None:
        raise SystemExit("training finished but wrote no checkpoint under runs/")
    return ckpt


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--load", type=Path, default=None)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32, help="bytes per prompt")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--draft-tokens", type=int, default=None, help="MTP drafts per main-model step (default: "
                    "speculative_generate's)")
    ap.add_argument("--train-iters-if-missing", type=int, default=300)
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    import megatron_dsv3 as m
    from megatron_dsv3.inference import InferenceEngine, speculative_generate
    from megatron_dsv3.inference.speculative import DEFAULT_DRAFT_TOKENS
    from megatron_dsv3.inference.cli import load_model
    from megatron_dsv3.data import ByteTokenizer, builtin_corpus

    trained_here = False
    ckpt = args.load or newest_checkpoint()
    if ckpt is None:
        ckpt, trained_here = train_one(args.train_iters_if_missing), True
    model, state = load_model(ckpt, m.presets.get_preset(args.preset))
    k = args.draft_tokens or DEFAULT_DRAFT_TOKENS
    engine = InferenceEngine(model, capacity=args.prompt_len + args.new_tokens + k + 1)
    tok, text = ByteTokenizer(), builtin_corpus()
    step = len(text) // (args.prompts + 1)
    prompts = [tok.tokenize(text[(i + 1) * step : (i + 1) * step + args.prompt_len])[: args.prompt_len]
               for i in range(args.prompts)]

    engine.generate(prompts[0], 4)                      # warm-up
    speculative_generate(engine, prompts[0], 4, draft_tokens=k)
    plain_t = spec_t = 0.0
    plain_steps = spec_steps = new = drafted = accepted = 0
    identical = True
    for p in prompts:
        t = time.perf_counter()
        plain = engine.generate(p, args.new_tokens)
        plain_t += time.perf_counter() - t
        t = time.perf_counter()
        spec = speculative_generate(engine, p, args.new_tokens, draft_tokens=k)
        spec_t += time.perf_counter() - t
        identical &= spec.as_list() == plain.as_list()
        new += plain.stats["new_tokens"]
        plain_steps += plain.stats["main_model_steps"]
        spec_steps += spec.stats["main_model_steps"]
        drafted += spec.stats["drafted"]
        accepted += spec.stats["accepted_drafts"]
    result = {
        "checkpoint": str(ckpt), "iteration": state.get("iteration"), "trained_by_benchmark": trained_here,
        "prompts": len(prompts), "prompt_len": args.prompt_len, "new_tokens_per_prompt": args.new_tokens,
        "outputs_identical": identical, "draft_tokens": k,
        "acceptance_rate": accepted / max(drafted, 1),
        "spec_tokens_per_main_step": new / spec_steps,
        "plain_tokens_per_main_step": new / plain_steps,
        "main_step_ratio": (new / spec_steps) / (new / plain_steps),
        "spec_tokens_per_s": new / spec_t, "plain_tokens_per_s": new / plain_t,
        "wall_speedup": plain_t / spec_t,
        "cache_bytes_per_token": plain.stats["cache_bytes_per_token"],
        "mtp_cache_bytes_per_token": spec.stats["mtp_cache_bytes_per_token"],
        "standard_kv_bytes_per_token": plain.stats["standard_kv_bytes_per_token"],
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(result))
    if not identical:
        raise SystemExit("speculative output differs from plain greedy output")
    return result


if __name__ == "__main__":
    main()
