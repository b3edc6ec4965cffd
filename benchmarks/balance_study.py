"""Auxiliary-loss-free balancing against the auxiliary loss and no balancing, measured as the method's paper does.

    python benchmarks/balance_study.py [--steps 300] [--seeds 2] [--parallel 2] [--plot docs/balance.png]

A small DeepSeekMoE (4 layers, the first dense; 16 routed experts, top-4, 1 shared; sigmoid gate; no group
limit, as in arXiv 2408.15664) trains with dsv3-pretrain's trainer on the built-in corpus, once per arm and
seed. Each run reports MaxVio_batch per step (max load / mean load - 1 on that step's tokens, averaged over the
MoE layers), MaxVio_global (the same over the whole validation split), and the validation loss. Ends with one
JSON line per arm (means and spreads over seeds).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAPE = ["--preset", "tiny", "--num-layers", "4", "--num-experts", "16", "--moe-router-topk", "4",
         "--moe-router-num-groups", "1", "--moe-router-group-topk", "1", "--moe-ffn-hidden-size", "32",
         "--moe-shared-expert-intermediate-size", "32", "--mtp-num-layers", "0", "--seq-length", "64",
         "--micro-batch-size", "8", "--lr", "1e-3", "--min-lr", "1e-4", "--lr-decay-style", "cosine",
         "--lr-warmup-iters", "20", "--weight-decay", "0.1", "--adam-beta2", "0.95", "--no-progress"]
# arm -> flags; every arm sets the bias update rate and the balance loss explicitly.
ARMS = {
    "none": ["--moe-router-bias-update-rate", "0", "--moe-router-load-balancing-type", "none"],
    "aux_loss_1e-3": ["--moe-router-bias-update-rate", "0", "--moe-router-load-balancing-type", "aux_loss",
                      "--moe-aux-loss-coeff", "1e-3"],
    "aux_loss_1e-2": ["--moe-router-bias-update-rate", "0", "--moe-router-load-balancing-type", "aux_loss",
                      "--moe-aux-loss-coeff", "1e-2"],
    "aux_free_1e-3": ["--moe-router-bias-update-rate", "1e-3", "--moe-router-load-balancing-type", "none"],
    "aux_free_1e-2": ["--moe-router-bias-update-rate", "1e-2", "--moe-router-load-balancing-type", "none"],
    "aux_free_1e-2+seq_aux": ["--moe-router-bias-update-rate", "1e-2", "--moe-router-load-balancing-type",
                              "seq_aux_loss", "--moe-aux-loss-coeff", "1e-4"],
}


def validation_loads(trainer, batches: int):
    """Per decoder MoE layer, the tokens each expert receives over `batches` validation micro-batches."""
    import torch

    from megatron_dsv3.moe.router import DeepSeekRouter

    model = trainer.model_chunks[0].module
    routers = [m for name, m in model.named_modules() if isinstance(m, DeepSeekRouter) and not name.startswith("mtp")]
    counts = torch.zeros(len(routers), routers[0].config.num_moe_experts, dtype=torch.float64)
    def counter(i):
        def count(module, args, output):  # output: (probs, routing_map [tokens, experts])
            counts[i] += output[1].sum(0).double()
        return count

    hooks = [r.register_forward_hook(counter(i)) for i, r in enumerate(routers)]
    model.eval()
    data = trainer._iterator(trainer.valid_data, 0)
    with torch.no_grad():
        for _ in range(batches):
            batch = next(data)
            model(batch["tokens"], batch["position_ids"], None)
    for hook in hooks:
        hook.remove()
    return counts


def worker(arm: str, seed: int, steps: int) -> dict:
    """One run in this process: train, then measure on the validation split."""
    from megatron_dsv3.tracking.moe_metrics import maxvio
    from megatron_dsv3.training.pretrain import prepare
    from megatron_dsv3.training.trainer import Trainer

    argv = SHAPE + ARMS[arm] + ["--train-iters", str(steps), "--seed", str(seed), "--eval-interval", str(steps),
                                "--eval-iters", "8"]
    trainer = Trainer(*prepare(argv))
    try:
        summary = trainer.train()
        loads = validation_loads(trainer, batches=32)
    finally:
        trainer.close()
    curve = summary["maxvio_batch"]
    return {"arm": arm, "seed": seed, "maxvio_global": float(maxvio(loads).mean()),
            "maxvio_batch_mean": statistics.fmean(curve), "maxvio_batch_last50": statistics.fmean(curve[-50:]),
            "valid_loss": summary["valid_lm_loss"], "maxvio_batch": curve, "valid_expert_loads": loads.tolist()}


def _spawn(arm: str, seed: int, steps: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, __file__, "--worker", arm, str(seed), "--steps", str(steps)], env=env,
                         capture_output=True, text=True, cwd=REPO)
    if out.returncode:
        raise RuntimeError(f"{arm} seed {seed}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _plot(runs: list[dict], path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for arm in ARMS:
        curves = [r["maxvio_batch"] for r in runs if r["arm"] == arm]
        mean = [statistics.fmean(step) for step in zip(*curves)]
        smooth = [statistics.fmean(mean[max(0, i - 9):i + 1]) for i in range(len(mean))]
        ax.plot(range(1, len(smooth) + 1), smooth, label=arm)
    ax.set_xlabel("step")
    ax.set_ylabel("MaxVio_batch (10-step mean, over seeds)")
    ax.set_yscale("log")
    ax.set_title("Load balance while training (16 experts, top-4, 4 layers)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=2, metavar=("ARM", "SEED"), help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=2, help="runs at once (one thread each)")
    parser.add_argument("--plot", default=None, help="write the MaxVio_batch curves to this PNG")
    parser.add_argument("--loads-out", default=None, help="write each arm's validation expert loads (seed 1) as JSON")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.steps)))
        return
    jobs = [(arm, seed) for seed in range(1, args.seeds + 1) for arm in ARMS]
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        runs = list(pool.map(lambda job: _spawn(*job, args.steps), jobs))
    if args.plot:
        _plot(runs, args.plot)
    if args.loads_out:
        Path(args.loads_out).write_text(json.dumps({r["arm"]: r["valid_expert_loads"] for r in runs if r["seed"] == 1}))
    for arm in ARMS:
        mine = [r for r in runs if r["arm"] == arm]
        line = {"arm": arm, "seeds": len(mine)}
        for key in ("maxvio_global", "maxvio_batch_mean", "maxvio_batch_last50", "valid_loss"):
            values = [r[key] for r in mine]
            line[key] = statistics.fmean(values)
            line[key + "_spread"] = (max(values) - min(values)) / 2
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
