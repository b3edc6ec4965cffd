"""Check a pickle from a checkpoint without running code from it: only the classes torch DCP and megatron-core
write may appear (`.metadata` is torch.distributed.checkpoint's pickled index of the shards)."""
from __future__ import annotations

import pickle
from pathlib import Path

import torch

_MODULE_PREFIXES = ("torch.distributed.checkpoint.", "megatron.core.dist_checkpointing.")
_NAMES = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
          ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"), ("builtins", "complex")}


class UnsafePickle(ValueError):
    """A pickle that names a class or function outside the allowed set."""


def _allowed(module: str, name: str) -> bool:
    if (module, name) in _NAMES or module.startswith(_MODULE_PREFIXES):
        return True
    if module == "torch":  # dtypes, layouts and memory formats are plain values
        return isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format))
    return False


class _Restricted(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if not _allowed(module, name):
            raise UnsafePickle(f"holds {module}.{name}, which a checkpoint index never contains; refusing to "
                               "unpickle it (it could run code)")
        return super().find_class(module, name)


def check(path: Path) -> None:
    """Unpickle `path` with only the allowed classes; raises UnsafePickle otherwise (and on a broken file)."""
    try:
        with open(path, "rb") as f:
            _Restricted(f).load()
    except UnsafePickle:
        raise
    except Exception as exc:  # truncated or not a pickle
        raise UnsafePickle(f"unreadable ({type(exc).__name__}: {' '.join(str(exc).split())[:160]})") from None
