"""megatron_dsv3: DeepSeek-V3 (MLA, DeepSeekMoE, MTP, FP8, DualPipe) as a megatron-core plugin.

The `dsv3` model spec is registered in `registry` (resolved on first use); importing patches nothing (CPU
workarounds apply in runtime.initialize). Names below load on first access, so light tools (dsv3-convert)
do not pay for importing megatron-core.
"""
import importlib

from megatron_dsv3.notices import silence_irrelevant_notices

silence_irrelevant_notices()  # before megatron-core's imports announce absent GPU extras

_LAZY = {
    "DSV3Config": "megatron_dsv3.config", "YarnConfig": "megatron_dsv3.config",
    "build_model": "megatron_dsv3.model.builder", "count_parameters": "megatron_dsv3.model.parameters",
}
_SUBMODULES = ("presets", "registry", "runtime")

__all__ = [*_LAZY, *_SUBMODULES]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"megatron_dsv3.{name}")
    raise AttributeError(f"module 'megatron_dsv3' has no attribute {name!r}")
