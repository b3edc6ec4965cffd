"""Module classes per implementation: specs are written once against `Backend`, never with `if te` chains."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from megatron.core.models.backends import BackendSpecProvider, LocalSpecProvider

from megatron_dsv3.attention.core_attention import MLACoreAttention
from megatron_dsv3.model.norm import LatentRMSNorm, RMSNorm


@dataclass(frozen=True)
class Backend:
    """What one implementation supplies: megatron-core's provider for linears/experts plus norms and attention."""

    name: str
    provider: BackendSpecProvider
    norm: type
    latent_norm: type
    core_attention: type
    down_proj_linear: type  # MLA down projections (replicated across tensor-parallel ranks)


def _local() -> Backend:
    provider = LocalSpecProvider()
    return Backend("local", provider, RMSNorm, LatentRMSNorm, MLACoreAttention, provider.column_parallel_linear())


def _te() -> Backend:
    from megatron.core.extensions.transformer_engine import TEDotProductAttention, TENorm
    from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

    provider = TESpecProvider()
    return Backend("te", provider, TENorm, TENorm, TEDotProductAttention, provider.linear())


BACKENDS: dict[str, Callable[[], Backend]] = {"local": _local, "te": _te}


def te_available() -> bool:
    """Transformer Engine is usable: importable and a CUDA device present."""
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def get_backend(name: Optional[str] = None) -> Backend:
    """`local`, `te`, or None for TE when it is importable on a GPU, else local."""
    if name is None:
        name = "te" if te_available() else "local"
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {sorted(BACKENDS)}, got {name!r}")
    if name == "te" and not te_available():
        raise ValueError("backend: 'te' needs Transformer Engine and a CUDA GPU; use 'local' on CPU")
    return BACKENDS[name]()
