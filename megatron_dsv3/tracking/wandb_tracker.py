"""Rank-0 Weights & Biases logger for training and MoE routing metrics; offline unless an API key exists."""
from __future__ import annotations

import collections
import os
import sys
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .moe_metrics import expert_load_heatmap, moe_step_metrics

__all__ = ["WandbTracker"]

_MISSING = "--wandb-project: wandb is not installed; pip install 'megatron-dsv3[wandb]'"


def _global_rank() -> int:
    """torch.distributed rank when a process group exists, else 0."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def _has_api_key() -> bool:
    """True if WANDB_API_KEY is set or ~/.netrc holds credentials for the configured W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        from wandb.sdk.lib.wbauth import read_netrc_auth

        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
        return bool(read_netrc_auth(host=host))
    except Exception:  # unreadable netrc or changed wandb internals: treat as no key
        return False


def _scalar(v: Any) -> Any:
    """Turn one-element tensors into Python numbers so wandb stores them as scalars."""
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return v.item()
    return v


class WandbTracker:
    """Owns one wandb run on global rank 0; every method is a no-op on the other ranks."""

    def __init__(
        self,
        project: str,
        exp_name: str | None = None,
        save_dir: str | None = None,
        entity: str | None = None,
        config: dict | None = None,
        rank: int | None = None,
        heatmap_interval: int = 50,
        init_timeout: float = 120.0,
    ):
        try:
            import wandb
        except ImportError as err:
            raise ValueError(_MISSING) from err
        self._wandb = wandb
        self.rank = _global_rank() if rank is None else int(rank)
        self.heatmap_interval = int(heatmap_interval or 0)
        self._history: collections.deque = collections.deque(maxlen=max(1, self.heatmap_interval))
        self._run = None
        self._run_dir: str | None = None
        self.offline = False
        if self.rank != 0:
            return
        save_dir = save_dir or os.path.join("runs", "wandb")
        os.makedirs(save_dir, exist_ok=True)
        self.offline = os.environ.get("WANDB_MODE", "").lower() == "offline" or not _has_api_key()
        self._run = wandb.init(
            project=project,
            name=exp_name,
            entity=entity,
            dir=save_dir,
            config=dict(config or {}),
            mode="offline" if self.offline else None,
            settings=wandb.Settings(init_timeout=init_timeout),
        )
        self._run_dir = str(self._run.settings.sync_dir) if self._run.settings.sync_dir else None

    @property
    def enabled(self) -> bool:
        """Whether this rank holds a live run."""
        return self._run is not None

    @property
    def run_dir(self) -> str | None:
        """Local folder of the run (holds the run-*.wandb file); None on non-logging ranks."""
        return self._run_dir

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log a dict of metrics at an explicit training step."""
        if self._run is None:
            return
        self._run.log({k: _scalar(v) for k, v in metrics.items()}, step=int(step))

    def log_moe(
        self,
        loads: torch.Tensor,
        biases: torch.Tensor,
        layer_names: Sequence[str],
        step: int,
    ) -> None:
        """Log expert loads and bias stats; every heatmap_interval steps also a heatmap of the recent window."""
        if self._run is None:
            return
        loads = torch.as_tensor(loads).detach().float().cpu()
        metrics: dict[str, Any] = moe_step_metrics(loads, biases, layer_names)
        self._history.append(loads)
        if self.heatmap_interval > 0 and int(step) % self.heatmap_interval == 0:
            fig = expert_load_heatmap(list(self._history), layer_names, window=len(self._history))
            try:
                fig.canvas.draw()
                pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
                metrics["moe/expert_load_heatmap"] = self._wandb.Image(pixels, caption=f"step {step}")
            finally:
                if "matplotlib.pyplot" in sys.modules:
                    sys.modules["matplotlib.pyplot"].close(fig)
                fig.clear()
        self.log(metrics, step)

    def finish(self, exit_code: int | None = None) -> None:
        """Flush and close the run; safe to call more than once."""
        if self._run is None:
            return
        run, self._run = self._run, None
        run.finish(exit_code=exit_code)

    def __enter__(self) -> "WandbTracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(exit_code=1 if exc_type is not None else None)
