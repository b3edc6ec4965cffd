"""`dsv3-generate`: text generation from a dsv3-pretrain checkpoint with the MLA latent cache.

    dsv3-generate --load runs/tiny-XXXX/checkpoints --preset tiny --prompt "def " --max-new-tokens 64 --greedy
    dsv3-generate --load CKPT --preset tiny --prompt "x" --max-new-tokens 64 --temperature 0.8 --top-k 40 --seed 1
    dsv3-generate --load CKPT --preset tiny --prompt "x" --max-new-tokens 64 --speculative [--draft-tokens N]

The model flags are dsv3-pretrain's (`--preset` plus Megatron-LM overrides such as `--num-layers`), parsed the
same way, so a checkpoint is read with the flags it was trained with. Prints the generated text, then one JSON
line: tokens_per_s, cache_bytes_per_token, acceptance_rate (speculative only), ...
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from typing import Optional, Sequence


from megatron_dsv3.checkpoint.dist import CheckpointError
from megatron_dsv3.cli.errors import UsageError, exit_on_usage_error
from megatron_dsv3.inference.speculative import DEFAULT_DRAFT_TOKENS

PROG = "dsv3-generate"


def add_generate_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("dsv3-generate")
    g.add_argument("--prompt", type=str, default=None, help="prompt text (byte tokenizer)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--greedy", action="store_true", help="argmax decoding (the default unless --temperature > 0)")
    g.add_argument("--temperature", type=float, default=None, help="sample with this temperature")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens when sampling (0: all)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    g.add_argument("--speculative", action="store_true", help="greedy MTP speculative decoding")
    g.add_argument("--draft-tokens", type=int, default=None,
                   help=f"with --speculative: MTP drafts per main-model step, chained past the first "
                        f"(default {DEFAULT_DRAFT_TOKENS})")
    g.add_argument("--stop-at-eod", action="store_true", help="stop after the byte tokenizer's end-of-document id")
    g.add_argument("--capacity", type=int, default=None,
                   help="cache positions (default: prompt + new tokens + 1, + draft tokens with --speculative)")
    return parser


def load_model(load_dir, cfg, seed: int = 1234, backend: Optional[str] = "local"):
    """Initialise a one-process runtime, build the model for `cfg` and load a dsv3-pretrain checkpoint into it."""
    from megatron_dsv3 import runtime
    from megatron_dsv3.checkpoint.dist import load_checkpoint
    from megatron_dsv3.model.builder import build_model

    cfg = cfg.replace(tensor_model_parallel_size=1, pipeline_model_parallel_size=1, expert_model_parallel_size=1)
    runtime.initialize(tp=1, pp=1, ep=1, seed=seed)
    model = build_model(cfg, backend=backend)
    state = load_checkpoint(load_dir, [model], load_rng=False)
    return model.eval(), state


def _logs_to_stderr() -> None:
    """megatron.training installs a root log handler on stdout; stdout here is the text and the JSON line."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) is sys.stdout:
            handler.setStream(sys.stderr)


def run(argv: Sequence[str]) -> dict:
    from megatron_dsv3.cli.model_config import config_from_args
    from megatron_dsv3.cli.parser import parse_megatron_args
    from megatron_dsv3.data.tokenizer import ByteTokenizer
    from megatron_dsv3.inference.generate import InferenceEngine
    from megatron_dsv3.inference.speculative import speculative_generate

    args, explicit = parse_megatron_args(argv, add_generate_args)
    _logs_to_stderr()
    if not args.load:
        raise UsageError("--load: required, a dsv3-pretrain checkpoint directory")
    if args.prompt is None or args.prompt == "":
        raise UsageError("--prompt: required, non-empty text")
    if args.max_new_tokens is None or args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens: must be >= 1, got {args.max_new_tokens}")
    sampling = args.temperature is not None and args.temperature > 0 and not args.greedy
    if args.speculative and sampling:
        raise UsageError("--speculative: greedy only; drop --temperature or pass --greedy")
    if args.draft_tokens is not None and not args.speculative:
        raise UsageError("--draft-tokens: only used with --speculative")
    draft_tokens = DEFAULT_DRAFT_TOKENS if args.draft_tokens is None else args.draft_tokens
    if draft_tokens < 1:
        raise UsageError(f"--draft-tokens: must be >= 1, got {draft_tokens}")
    if not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p: must be in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        raise UsageError(f"--top-k: must be >= 0 (0 keeps every token), got {args.top_k}")
    if args.temperature is not None and not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UsageError(f"--temperature: must be a finite number >= 0, got {args.temperature}")
    cfg = config_from_args(args, explicit)
    tok = ByteTokenizer()
    if cfg.vocab_size < tok.vocab_size:
        raise UsageError(f"--vocab-size: the model's vocabulary ({cfg.vocab_size}) is smaller than the byte "
                         f"tokenizer's ({tok.vocab_size})")
    ids = tok.tokenize(args.prompt)
    needed = len(ids) + args.max_new_tokens  # speculative too: its drafts stop at the last token asked for
    if needed > cfg.max_position_embeddings:
        raise UsageError(f"--max-new-tokens: the prompt ({len(ids)} tokens) plus {args.max_new_tokens} new tokens "
                         f"exceed the model's position limit --max-position-embeddings {cfg.max_position_embeddings}")
    if args.capacity is not None and args.capacity < needed:
        raise UsageError(f"--capacity: {args.capacity} cache positions cannot hold the prompt and the new tokens "
                         f"({needed})")
    capacity = args.capacity or needed
    model, state = load_model(args.load, cfg, seed=args.seed, backend=getattr(args, "dsv3_backend", None) or "local")
    engine = InferenceEngine(model, capacity=capacity)
    eos = tok.eod if args.stop_at_eod else None
    try:
        if args.speculative:
            out = speculative_generate(engine, ids, args.max_new_tokens, eos_id=eos, draft_tokens=draft_tokens)
        else:
            out = engine.generate(ids, args.max_new_tokens, greedy=not sampling,
                                  temperature=args.temperature or 1.0, top_k=args.top_k, top_p=args.top_p,
                                  seed=args.seed, eos_id=eos)
    except ValueError as err:
        raise UsageError(str(err)) from None
    text = tok.detokenize(out.as_list())
    stats = out.stats
    stats.update(load=str(args.load), iteration=state.get("iteration"), tokens=out.as_list(), text=text)
    stats.setdefault("acceptance_rate", None)
    return stats


def main(argv: Optional[Sequence[str]] = None) -> None:
    from megatron_dsv3.notices import quiet_third_party

    quiet_third_party()
    argv = list(sys.argv[1:] if argv is None else argv)
    with exit_on_usage_error(PROG, CheckpointError):
        stats = run(argv)
    print(stats.pop("text"))
    print(json.dumps(stats))


def cli() -> None:
    """The `dsv3-generate` console script."""
    from megatron_dsv3.cli.exit import exit_after

    exit_after(main)


if __name__ == "__main__":
    cli()
