"""megatron_dsv3: DeepSeek-V3 (MLA, DeepSeekMoE, MTP, FP8, DualPipe) as a megatron-core plugin.

Importing registers the `dsv3` model spec; it patches nothing (CPU workarounds apply in runtime.initialize).
"""
from megatron_dsv3 import presets, registry, runtime
from megatron_dsv3.config import DSV3Config, YarnConfig
from megatron_dsv3.model.builder import build_model
from megatron_dsv3.model.specs import decoder_block_spec, mtp_block_spec

registry.register(registry.ModelSpec("dsv3", decoder_block_spec, mtp_block_spec), replace=True)

__all__ = ["DSV3Config", "YarnConfig", "build_model", "presets", "registry", "runtime"]
__version__ = "0.1.0"
