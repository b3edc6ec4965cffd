"""Named model specs for megatron-core (`--model-spec NAME`); the built-in `dsv3` spec is loaded on first use."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class ModelSpec:
    """How to build one architecture's blocks: each function takes (mcore_config, backend, vp_stage, pp_rank)."""

    name: str
    decoder_block_spec: Callable
    mtp_block_spec: Callable


_SPECS: dict[str, ModelSpec] = {}
_BUILTIN = {"dsv3": "megatron_dsv3.model.specs"}  # name -> module whose import registers it (megatron-core)


def _load_builtins() -> None:
    import importlib

    for name, module in _BUILTIN.items():
        if name not in _SPECS:
            importlib.import_module(module)


def register(spec: ModelSpec, *, replace: bool = False) -> ModelSpec:
    """Add a spec under its name; refuses to overwrite one unless `replace`."""
    if spec.name in _SPECS and not replace:
        raise ValueError(f"model spec {spec.name!r} is already registered")
    _SPECS[spec.name] = spec
    return spec


def get(name: str) -> ModelSpec:
    """The spec registered as `name`, or a ValueError listing the known ones."""
    _load_builtins()
    try:
        return _SPECS[name]
    except KeyError:
        raise ValueError(f"--model-spec: unknown spec {name!r}; registered: {sorted(_SPECS)}") from None


def names() -> list[str]:
    _load_builtins()
    return sorted(_SPECS)
