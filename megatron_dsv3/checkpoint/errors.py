"""The checkpoint format's file names, its one-line errors and the value check behind one, shared by saving, loading,
checks and conversion."""
from __future__ import annotations

import json
from pathlib import Path

LATEST = "latest_checkpointed_iteration.txt"
TRAIN_STATE = "train_state.json"
META = "metadata.json"  # megatron-core's own file; it ignores the extra keys we add
FORMAT = "megatron_dsv3.dist/1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded or saved; the message starts with `--load: ` or `--save: ` and names
    the path."""


def fail(path, problem: str):
    error = CheckpointError(f"--load: {path}: {problem}")
    error.__suppress_context__ = True  # one line for the user, not the chained library traceback
    raise error


def brief(exc: BaseException) -> str:
    """An exception as one short line (torch and megatron-core errors can span many)."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:240]}"


def read_json(path: Path) -> dict:
    if not path.is_file():
        fail(path, "missing (incomplete checkpoint)")
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        fail(path, f"corrupt JSON ({exc})")


def all_finite(t) -> bool:
    """No NaN or Inf in a tensor: one min/max pass (both propagate NaN) without a mask of the tensor's size."""
    import torch

    if not t.is_floating_point() or t.numel() == 0:
        return True
    if t.element_size() == 1:  # FP8 has no min/max kernels
        t = t.float()
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))

