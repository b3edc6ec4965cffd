"""Megatron-LM's own argument parser with the dsv3 flags, DeepSeek-V3's values as its defaults.

Every entry point (dsv3-pretrain, dsv3-generate, `python -m megatron_dsv3.megatron_lm`, a patched
pretrain_gpt.py) parses with `megatron.training.arguments`, so flags keep Megatron-LM's names and meaning.
When the dsv3 spec is requested, the `--preset` shape (DeepSeek-V3 671B without one) and DeepSeek's recipe
become the parser's defaults: Megatron-LM's validation and config builders see a DeepSeek model, and flags
given on the command line still win.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Callable, Optional, Sequence

import torch

from megatron_dsv3 import registry
from megatron_dsv3.cli.errors import UsageError
from megatron_dsv3.cli.model_config import FLAG_NAMES, megatron_defaults
from megatron_dsv3.config import DSV3Config
from megatron_dsv3.pipeline.dual import SCHEDULES as PIPELINE_SCHEDULES
from megatron_dsv3.presets import PRESETS, get_preset


def add_dsv3_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The plugin's flags, added next to Megatron-LM's (the YaRN ones only where Megatron lacks them)."""
    group = parser.add_argument_group(title="megatron_dsv3")
    group.add_argument("--model-spec", default="dsv3",
                       help=f"registered layer spec to build (known: {', '.join(registry.names())})")
    group.add_argument("--preset", default=None,
                       help=f"base DeepSeek-V3 shape ({', '.join(PRESETS)}); explicit flags override it")
    known = {o for a in parser._actions for o in a.option_strings}
    for flag, kind, text in (("--beta-fast", float, "YaRN beta_fast"), ("--beta-slow", float, "YaRN beta_slow"),
                             ("--original-max-position-embeddings", int, "YaRN original context length")):
        if flag not in known:
            group.add_argument(flag, type=kind, default=None, help=text)
    group.add_argument("--dsv3-backend", choices=["local", "te"], default=None,
                       help="module backend; default: te when Transformer Engine imports on a GPU, else local")
    group.add_argument("--fp8-no-scaling-control", action="store_true",
                       help="numerics negative control for --fp8-recipe blockwise: cast GEMM operands to E4M3 "
                            "with scale 1 (no block scaling); not for real training")
    group.add_argument("--pipeline-schedule", choices=PIPELINE_SCHEDULES, default="1f1b",
                       help="pipeline schedule: megatron-core's 1F1B, or DeepSeek-V3's DualPipe (two chunks per "
                            "rank: a stage and its mirror) or DualPipeV (2 x PP stages placed in a V)")
    group.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                       help="show a progress bar with loss and tokens/s (dsv3-pretrain)")
    return parser


def chain_providers(*providers: Optional[Callable]) -> Callable:
    """One extra_args_provider that applies each given provider in turn (None entries skipped)."""

    def provider(parser):
        for p in providers:
            if p is not None:
                parser = p(parser) or parser
        return parser

    return provider


def _flag_value(argv: Sequence[str], flag: str) -> Optional[str]:
    for i, token in enumerate(argv):
        if token == flag and i + 1 < len(argv):
            return argv[i + 1]
        if token.startswith(flag + "="):
            return token.split("=", 1)[1]
    return None


def dsv3_requested(argv: Sequence[str]) -> bool:
    """The command line asks for this plugin: `--model-spec dsv3` or `--preset` (a patched pretrain_gpt.py
    builds its own GPT model otherwise)."""
    return _flag_value(argv, "--model-spec") == "dsv3" or _flag_value(argv, "--preset") is not None


def install_dsv3_defaults(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    """The preset's shape and DeepSeek's recipe as the parser's defaults (see `megatron_defaults`)."""
    name = _flag_value(argv, "--preset")
    if name is not None and name not in PRESETS:
        return  # reported by config_from_args, naming the flag
    cfg = get_preset(name) if name else DSV3Config()
    known = {a.dest for a in parser._actions}
    parser.set_defaults(**{dest: value for dest, value in megatron_defaults(cfg, torch.cuda.is_available()).items()
                           if dest in known})


def explicit_dests(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """The dests of options that appear on the command line (so presets never override them)."""
    by_flag = {o: a.dest for a in parser._actions for o in a.option_strings}
    return {by_flag[tok.split("=", 1)[0]] for tok in argv if tok.split("=", 1)[0] in by_flag}


def _raise_usage_error(message: str):
    raise UsageError(message)


def dsv3_parser_provider(argv: Sequence[str], *, implied: bool, extra: Optional[Callable] = None,
                         remember: Optional[dict] = None) -> Callable:
    """The extra_args_provider every entry point gives Megatron-LM: our flags, `extra`'s, DeepSeek defaults
    (always when `implied`, else only when the command line asks for dsv3), one-line argparse errors."""
    from megatron_dsv3.compat import escape_help_percents

    def provider(parser):
        parser = chain_providers(extra, add_dsv3_args)(parser)
        escape_help_percents(parser)
        if implied or dsv3_requested(argv):
            install_dsv3_defaults(parser, argv)
            parser.error = _raise_usage_error  # not a 700-line usage dump before the one-line message
        FLAG_NAMES.update({a.dest: a.option_strings[0] for a in parser._actions if a.option_strings})
        if remember is not None:
            remember["parser"] = parser
        return parser

    return provider


@contextlib.contextmanager
def _argv(argv: Sequence[str]):
    saved = sys.argv
    sys.argv = [saved[0] if saved else "dsv3", *argv]
    try:
        yield
    finally:
        sys.argv = saved


def validate_megatron_args(args: argparse.Namespace) -> None:
    """Megatron-LM's `validate_args` (derived sizes, params_dtype, consistency checks); its assertion
    messages become usage errors, its printout (every argument, ~700 lines) is dropped."""
    import io

    from megatron.training.arguments import validate_args

    from megatron_dsv3.compat import apply_megatron_args_patches
    apply_megatron_args_patches()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            validate_args(args, {})
    except AssertionError as err:
        raise UsageError(f"Megatron-LM rejects the flags: {assertion_text(err)}") from None


def assertion_text(err: AssertionError) -> str:
    """An assertion's message, or its source line when it has none (`assert args.seq_length is not None`)."""
    import traceback

    return str(err) or (traceback.extract_tb(err.__traceback__)[-1].line or "assertion failed")


def parse_megatron_args(argv: Sequence[str], extra_args_provider: Optional[Callable] = None):
    """Parse with Megatron-LM's parser; returns (args, explicitly given dests). Callers run their own checks,
    then `validate_megatron_args` where they need Megatron-LM's derived values."""
    from megatron.training.arguments import parse_args

    captured: dict = {}
    provider = dsv3_parser_provider(argv, implied=True, extra=extra_args_provider, remember=captured)
    with _argv(argv):
        args = parse_args(provider)
    return args, explicit_dests(captured["parser"], argv)
