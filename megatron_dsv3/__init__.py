"""megatron_dsv3: DeepSeek-V3 (MLA, DeepSeekMoE, MTP, FP8, DualPipe) as a megatron-core plugin.

Importing registers the `dsv3` model spec; it patches nothing (CPU workarounds apply in runtime.initialize).
"""
from megatron_dsv3.notices import silence_irrelevant_notices

silence_irrelevant_notices()  # before megatron-core's imports announce absent GPU extras

from megatron_dsv3 import presets, registry, runtime  # noqa: E402
from megatron_dsv3.config import DSV3Config, YarnConfig  # noqa: E402
from megatron_dsv3.model.builder import build_model  # noqa: E402
from megatron_dsv3.model.parameters import count_parameters  # noqa: E402
from megatron_dsv3.model.specs import decoder_block_spec, mtp_block_spec  # noqa: E402

registry.register(registry.ModelSpec("dsv3", decoder_block_spec, mtp_block_spec), replace=True)

__all__ = ["DSV3Config", "YarnConfig", "build_model", "count_parameters", "presets", "registry", "runtime"]
__version__ = "0.1.0"
