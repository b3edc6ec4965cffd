"""Module classes per implementation: specs are written once against `Backend`, never with `if te` chains."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

from megatron.core.models.backends import BackendSpecProvider, LocalSpecProvider
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP

from megatron_dsv3 import runtime
from megatron_dsv3.attention.core_attention import MLACoreAttention
from megatron_dsv3.model.norm import LatentRMSNorm, RMSNorm
from megatron_dsv3.moe.grouped_experts import GroupedMLP


@dataclass(frozen=True)
class Backend:
    """What one implementation supplies: megatron-core's provider for linears/experts plus norms and attention."""

    name: str
    provider: BackendSpecProvider
    norm: type
    latent_norm: type
    core_attention: type
    down_proj_linear: type  # MLA down projections (replicated across tensor-parallel ranks)


class DSV3LocalSpecProvider(LocalSpecProvider):
    """megatron-core's local provider, whose experts become grouped GEMMs with `moe_grouped_gemm`
    (megatron-core's own local provider ignores the flag and always loops over experts)."""

    def grouped_mlp_modules(self, moe_use_grouped_gemm: bool):
        experts = super().grouped_mlp_modules(moe_use_grouped_gemm)
        return partial(GroupedMLP, **experts.keywords) if moe_use_grouped_gemm else experts


def _local() -> Backend:
    provider = DSV3LocalSpecProvider()
    return Backend("local", provider, RMSNorm, LatentRMSNorm, MLACoreAttention, provider.column_parallel_linear())


def _te() -> Backend:
    from megatron.core.extensions.transformer_engine import TEDotProductAttention, TENorm
    from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

    provider = TESpecProvider()
    return Backend("te", provider, TENorm, TENorm, TEDotProductAttention, provider.linear())


class FP8LocalSpecProvider(LocalSpecProvider):
    """The local backend with block-scaled FP8 linears (megatron_dsv3.fp8.layers) bound to one FP8Config.

    Only tensor-parallel linears change: MLA projections, dense/shared MLPs, routed experts (SequentialMLP)
    and the MTP projection. Embedding, output head (GPTModel builds it), router, norms and core attention are
    not linears from this provider and stay in high precision.
    """

    def __init__(self, fp8_config) -> None:
        from megatron_dsv3.fp8.layers import fp8_down_proj_class, fp8_linear_classes

        self.fp8_config = fp8_config
        self._col, self._row = fp8_linear_classes(fp8_config)
        self.down_proj_linear = fp8_down_proj_class(fp8_config)

    def column_parallel_linear(self) -> type:
        return self._col

    def row_parallel_linear(self) -> type:
        return self._row

    def grouped_mlp_modules(self, moe_use_grouped_gemm: bool):
        return partial(SequentialMLP, submodules=MLPSubmodules(
            linear_fc1=self._col, linear_fc2=self._row, activation_func=self.activation_func()))


def _local_fp8(fp8_config) -> Backend:
    provider = FP8LocalSpecProvider(fp8_config)
    return Backend("local", provider, RMSNorm, LatentRMSNorm, MLACoreAttention, provider.down_proj_linear)


BACKENDS: dict[str, Callable[[], Backend]] = {"local": _local, "te": _te}


def get_backend(name: Optional[str] = None, fp8_recipe=None) -> Backend:
    """`local`, `te`, or None for TE when it is importable on a GPU, else local.

    `fp8_recipe` (a `megatron_dsv3.fp8.FP8Config`) makes the local backend's linears block-scaled FP8; with
    'te', FP8 comes from megatron-core's config fields (fp8, fp8_recipe) instead, so it must stay None.
    """
    if name is None:
        name = "te" if runtime.te_available() else "local"
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {sorted(BACKENDS)}, got {name!r}")
    if name == "te" and not runtime.te_available():
        raise ValueError("backend: 'te' needs Transformer Engine and a CUDA GPU; use 'local' on CPU")
    if fp8_recipe is not None:
        if name != "local":
            raise ValueError("backend: fp8_recipe selects the local FP8 linears; with 'te' set the megatron-core "
                             "fields fp8='e4m3', fp8_recipe='blockwise' instead")
        return _local_fp8(fp8_recipe)
    return BACKENDS[name]()
