"""Per-step MoE routing statistics (expert loads, bias spread) and a load heatmap for logging."""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["maxvio", "moe_step_metrics", "expert_load_heatmap"]


def _check(t: torch.Tensor, layer_names: Sequence[str], what: str) -> torch.Tensor:
    """Validate a [layers, experts] tensor against the layer names and return it as CPU float64."""
    t = torch.as_tensor(t).detach().to("cpu", torch.float64)
    if t.dim() != 2 or t.shape[0] != len(layer_names):
        raise ValueError(f"{what} must have shape [{len(layer_names)}, experts], got {tuple(t.shape)}")
    return t


def _balance(loads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise max/mean and std/mean; a row with no tokens gives imbalance 1.0 and cv 0.0."""
    mean = loads.mean(dim=1)
    empty = mean <= 0
    safe = torch.where(empty, torch.ones_like(mean), mean)
    imbalance = torch.where(empty, torch.ones_like(mean), loads.max(dim=1).values / safe)
    cv = torch.where(empty, torch.zeros_like(mean), loads.std(dim=1, unbiased=False) / safe)
    return imbalance, cv


def maxvio(loads: torch.Tensor) -> torch.Tensor:
    """MaxVio per row of [layers, experts] token counts: max load / mean load - 1 (arXiv 2408.15664);
    0 for perfect balance and for a layer that routed no tokens."""
    loads = torch.as_tensor(loads).to(torch.float64)
    mean = loads.mean(dim=-1)
    return torch.where(mean > 0, loads.amax(dim=-1) / mean.clamp_min(1e-300) - 1.0, torch.zeros_like(mean))


def moe_step_metrics(
    loads: torch.Tensor, biases: torch.Tensor, layer_names: Sequence[str]
) -> dict[str, float]:
    """Flatten one step's [layers, experts] loads and router biases into scalar metrics.

    std values are population std; a layer that routed no tokens reports load_imbalance 1.0, load_cv 0.0 and
    maxvio 0.0. `moe/maxvio_mean` and `moe/maxvio_max` summarise MaxVio over the MoE layers.
    """
    loads = _check(loads, layer_names, "loads")
    biases = _check(biases, layer_names, "biases")
    if biases.shape != loads.shape:
        raise ValueError(f"biases shape {tuple(biases.shape)} != loads shape {tuple(loads.shape)}")
    imbalance, cv = _balance(loads)
    violation = maxvio(loads)
    out: dict[str, float] = {}
    for i, name in enumerate(layer_names):
        prefix = f"moe/{name}"
        for e, v in enumerate(loads[i].tolist()):
            out[f"{prefix}/tokens_per_expert/{e}"] = float(v)
        out[f"{prefix}/load_imbalance"] = float(imbalance[i])
        out[f"{prefix}/load_cv"] = float(cv[i])
        out[f"{prefix}/maxvio"] = float(violation[i])
        b = biases[i]
        out[f"{prefix}/bias_mean"] = float(b.mean())
        out[f"{prefix}/bias_std"] = float(b.std(unbiased=False))
        out[f"{prefix}/bias_min"] = float(b.min())
        out[f"{prefix}/bias_max"] = float(b.max())
    out["moe/max_load_imbalance"] = float(imbalance.max()) if len(layer_names) else 1.0
    out["moe/maxvio_mean"] = float(violation.mean()) if len(layer_names) else 0.0
    out["moe/maxvio_max"] = float(violation.max()) if len(layer_names) else 0.0
    return out


def expert_load_heatmap(
    history: Sequence[torch.Tensor], layer_names: Sequence[str], window: int = 1
):
    """Plot load / per-layer mean load (rows = layers, columns = experts) averaged over the last `window` steps.

    A layer with no tokens in the window is drawn as all zeros.
    """
    if not history:
        raise ValueError("expert_load_heatmap needs at least one step of loads")
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg canvas: no GUI, no pyplot state
    from matplotlib.figure import Figure

    recent = [_check(h, layer_names, "loads") for h in list(history)[-max(1, int(window)):]]
    avg = torch.stack(recent).mean(dim=0)
    mean = avg.mean(dim=1, keepdim=True)
    rel = torch.where(mean > 0, avg / torch.where(mean > 0, mean, torch.ones_like(mean)), torch.zeros_like(avg))

    n_layers, n_experts = rel.shape
    fig = Figure(figsize=(max(4.0, 0.25 * n_experts + 2), max(2.5, 0.3 * n_layers + 1.5)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(rel.numpy(), aspect="auto", interpolation="nearest", cmap="viridis")
    fig.colorbar(image, ax=ax, label="load / mean load")
    steps = "latest step" if len(recent) == 1 else f"mean of last {len(recent)} steps"
    ax.set_title(f"Expert load ({steps})")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_yticks(range(n_layers))
    ax.set_yticklabels(list(layer_names))
    fig.tight_layout()
    return fig
