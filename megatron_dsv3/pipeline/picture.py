"""Draw a simulated schedule the way the DeepSeek-V3 report's Figure 5 does: one row per rank, time across."""
from __future__ import annotations

from megatron_dsv3.pipeline.schedule import Op

# Forward, backward, weight, overlapped pair; the second direction (chunk 1) is drawn darker.
_COLOURS = {("F", 0): "#f6d55c", ("F", 1): "#e0a800", ("B", 0): "#7ec8e3", ("B", 1): "#2b7bb9",
            ("W", 0): "#b5e3a1", ("W", 1): "#4caf50", ("FB", 0): "#e58fb0", ("FB", 1): "#b03a74"}


def _label(op: Op) -> str:
    return f"{op.mb}|{op.mb2}" if op.kind == "FB" else str(op.mb)


def draw(timeline, path: str) -> None:
    """Save the timeline as a PNG: boxes coloured by op kind and direction, labelled with micro-batch ids."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    plan = timeline.plan
    fig, ax = plt.subplots(figsize=(max(8.0, timeline.makespan * 0.35), 0.5 * plan.ranks + 1.6))
    for rank, (ops, spans) in enumerate(zip(plan.ops, timeline.spans)):
        for op, (start, end) in zip(ops, spans):
            ax.barh(rank, end - start, left=start, height=0.8, color=_COLOURS[(op.kind, op.chunk)],
                    edgecolor="black", linewidth=0.4)
            ax.text((start + end) / 2, rank, _label(op), ha="center", va="center", fontsize=6)
    ax.set_yticks(range(plan.ranks), [f"rank {r}" for r in range(plan.ranks)])
    ax.invert_yaxis()
    ax.set_xlabel("time")
    ax.set_title(f"{plan.name}: {plan.ranks} ranks, {plan.microbatches} micro-batches, "
                 f"bubble {max(timeline.bubble_per_rank()):g}")
    ax.legend(handles=[Patch(color=c, label=f"{k} (chunk {d})") for (k, d), c in _COLOURS.items()],
              ncol=4, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.25))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
