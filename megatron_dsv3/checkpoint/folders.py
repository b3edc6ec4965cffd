"""Where checkpoints live in a save folder: Megatron-LM's `iter_N` names, `latest`, and which folder to load."""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Optional

from megatron_dsv3.checkpoint.errors import LATEST, fail
from megatron_dsv3.checkpoint.integrity import MANIFEST

log = logging.getLogger(__name__)


def iteration_dir(root, iteration: int) -> Path:
    """`root/iter_0000100`, Megatron-LM's naming."""
    return Path(root) / f"iter_{iteration:07d}"


def newest_intact(load_dir: Path) -> Optional[tuple[int, Path]]:
    """The newest `iter_N` folder whose write completed (it has its integrity record), if any."""
    done = [(int(p.name[5:]), p) for p in load_dir.glob("iter_*") if re.fullmatch(r"iter_\d{7}", p.name)
            and (p / MANIFEST).is_file()]
    return max(done) if done else None


def resolve_latest(load_dir: Path) -> tuple[int, Path]:
    """Read `latest` and find its iteration dir (or a copy set aside by an interrupted overwrite); a garbled
    `latest`, or one naming a folder that is gone, falls back to the newest intact checkpoint, with a warning."""
    if not load_dir.is_dir():
        fail(load_dir, "checkpoint directory does not exist")
    latest = load_dir / LATEST
    if not latest.is_file():
        fail(latest, "missing; no complete checkpoint was ever published here")
    text = latest.read_text(errors="replace").strip()
    if not text.isdigit():
        fallback = newest_intact(load_dir)
        if fallback is None:
            fail(latest, f"garbled: expected an iteration number, found {text[:40]!r}")
        log.warning("%s is garbled (%r); loading the newest intact checkpoint, %s", latest, text[:40], fallback[1])
        return fallback
    iteration = int(text)
    path = iteration_dir(load_dir, iteration)
    if not path.is_dir():
        aside = sorted(load_dir.glob(f"{path.name}.old-*"))
        if aside:
            log.warning("%s is missing; using %s left by an interrupted save", path, aside[-1])
            return iteration, aside[-1]
        fallback = newest_intact(load_dir)
        if fallback is None:
            fail(path, f"missing, but {latest} names iteration {iteration}")
        log.warning("%s is missing; loading the newest intact checkpoint, %s", path, fallback[1])
        return fallback
    return iteration, path
