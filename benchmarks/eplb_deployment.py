"""DeepSeek-V3's inference deployment arithmetic with `dsv3-eplb`'s placement, on expert loads from real runs.

    python benchmarks/eplb_deployment.py --loads balance_loads.json   # from balance_study.py --loads-out

The loads are validation-split token counts per expert of the balance study's trained models (16 experts per
layer). At that scale they are placed directly (1 node x 4 GPUs, 4 redundant slots). For the report's units
(256 experts: prefill 4 nodes x 8 GPUs with 32 redundant experts, 9 per GPU; decode 40 nodes x 8 GPUs with 64
redundant, one per GPU) 256-expert layers are drawn from the measured relative loads (each layer: 256 draws,
with replacement, of load / mean load from one measured layer). Prints one JSON line per setting.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics

from megatron_dsv3.inference.eplb import place_layers

UNITS = {  # name -> (experts, groups, nodes, gpus_per_node, redundant)
    "measured_16_experts": (16, 1, 1, 4, 4),
    "v3_prefill_unit": (256, 8, 4, 8, 32),
    "v3_decode_unit": (256, 8, 40, 8, 64),
}


def _drawn(layers: list[list[float]], experts: int, seed: int) -> list[list[float]]:
    rng = random.Random(seed)
    out = []
    for layer in layers:
        mean = statistics.fmean(layer)
        relative = [x / mean for x in layer]
        out.append([rng.choice(relative) for _ in range(experts)])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loads", required=True, help="JSON {arm: [layers][experts]} from balance_study.py")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with open(args.loads) as f:
        by_arm = json.load(f)
    for arm, layers in by_arm.items():
        for unit, (experts, groups, nodes, gpus_per_node, redundant) in UNITS.items():
            loads = layers if experts == len(layers[0]) else _drawn(layers, experts, args.seed)
            report = place_layers(loads, groups=groups, nodes=nodes, gpus_per_node=gpus_per_node,
                                  redundant=redundant)
            before = [layer["balance_before"] for layer in report["layers"]]
            after = [layer["balance_after"] for layer in report["layers"]]
            print(json.dumps({"arm": arm, "unit": unit, "gpus": nodes * gpus_per_node, "redundant": redundant,
                              "max_over_mean_before": statistics.fmean(before),
                              "max_over_mean_after": statistics.fmean(after)}))


if __name__ == "__main__":
    main()
