"""The checkpoint format's file names and its one-line errors, shared by saving, loading, checks and conversion."""
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
