"""Map Megatron-LM's FP8 flags (`--fp8-recipe`, `--fp8-format`) to how this machine runs FP8.

- Transformer Engine usable (and the backend is 'te'): megatron-core's own FP8 fields (fp8, fp8_recipe), so
  `--fp8-recipe blockwise --fp8-format e4m3` becomes TE's `Float8BlockScaling`.
- Otherwise only the blockwise recipe exists: the local backend's FP8 linears, on torch's native block-scaled
  FP8 GEMM on a Hopper GPU (`native.native_available()`), else the CPU/GPU emulation.
- TE-only recipes (delayed, tensorwise, mxfp8, custom) without TE: a ValueError naming the flag.
"""
from __future__ import annotations

from typing import Optional

from .linear import FP8Config

__all__ = ["TE_ONLY_RECIPES", "fp8_model_kwargs"]

TE_ONLY_RECIPES = ("delayed", "tensorwise", "mxfp8", "custom")


def _name(value) -> Optional[str]:
    return None if value is None else str(getattr(value, "value", value))


def fp8_model_kwargs(args, explicit: set, backend: Optional[str]) -> dict:
    """`build_model` keyword arguments (backend, and fp8 settings when FP8 was asked for) from parsed flags.

    FP8 is on when `--fp8-recipe` or `--fp8-format` is given explicitly (Megatron's defaults alone never turn
    it on). `backend` is the requested one ('local', 'te' or None for automatic). Raises ValueError, naming
    the flag, for combinations this machine cannot run.
    """
    from megatron_dsv3 import runtime

    no_scaling = bool(getattr(args, "fp8_no_scaling_control", False))
    wanted = "fp8_recipe" in explicit or "fp8" in explicit
    if not wanted:
        if no_scaling:
            raise ValueError("--fp8-no-scaling-control: needs --fp8-recipe blockwise (it replaces its scaling)")
        return {"backend": backend}
    recipe = _name(getattr(args, "fp8_recipe", None)) or "delayed"
    fmt = _name(getattr(args, "fp8", None)) or "e4m3"
    use_te = backend == "te" or (backend is None and runtime.te_available())
    if use_te:
        if no_scaling:
            raise ValueError("--fp8-no-scaling-control: only for the local blockwise FP8 linears "
                             "(use --dsv3-backend local)")
        return {"backend": "te", "fp8": fmt, "fp8_recipe": recipe}
    if recipe != "blockwise":
        raise ValueError(f"--fp8-recipe: {recipe!r} needs Transformer Engine (not usable here: it needs the package "
                         "and a CUDA GPU); without it only --fp8-recipe blockwise runs (CPU emulation, or torch's "
                         "block-scaled FP8 GEMMs on a Hopper GPU)")
    if fmt != "e4m3":
        raise ValueError(f"--fp8-format: the blockwise recipe uses E4M3 for all GEMM operands, got {fmt!r}")
    from .native import native_available

    gemm = "native" if native_available() else "emulated"
    return {"backend": "local", "fp8_recipe": FP8Config(scaling="none" if no_scaling else "blockwise", gemm=gemm)}
