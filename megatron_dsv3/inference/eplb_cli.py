"""`dsv3-eplb`: redundant-expert placement from logged expert loads, as JSON.

    dsv3-eplb --loads loads.json --nodes 4 --gpus-per-node 8 --redundant 32 --groups 8
    dsv3-eplb --wandb-run runs/latest/wandb/offline-run-... --nodes 1 --gpus-per-node 4 --redundant 4 --groups 4

`--loads` is a JSON list of per-layer lists of per-expert token counts; `--wandb-run` sums a dsv3-pretrain run's
logged `moe/<layer>/tokens_per_expert/<e>` over its steps (decoder layers, in order). Prints one JSON object:
per layer, max/mean GPU load before (contiguous expert-parallel layout, no redundancy) and after, the replica
counts and each GPU's experts.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Optional, Sequence

from megatron_dsv3.cli.errors import UsageError, exit_on_usage_error

PROG = "dsv3-eplb"


def loads_from_history(rows: list[dict]) -> list[list[float]]:
    """Per decoder MoE layer, per expert: tokens summed over the logged steps."""
    totals: dict[str, dict[int, float]] = {}
    for row in rows:
        for key, value in row.items():
            found = re.fullmatch(r"moe/(layer_\d+)/tokens_per_expert/(\d+)", key)
            if found and value is not None:
                layer = totals.setdefault(found.group(1), {})
                layer[int(found.group(2))] = layer.get(int(found.group(2)), 0.0) + float(value)
    return [[experts[e] for e in sorted(experts)] for _, experts in sorted(totals.items())]


def _read_loads(args) -> list[list[float]]:
    if (args.loads is None) == (args.wandb_run is None):
        raise UsageError("--loads / --wandb-run: give exactly one source of expert loads")
    if args.wandb_run is not None:
        from megatron_dsv3.tracking.offline_history import read_history
        try:
            loads = loads_from_history(read_history(args.wandb_run, timeout=5.0))
        except (ValueError, TimeoutError, OSError) as err:
            raise UsageError(f"--wandb-run: {err}") from None
        if not loads:
            raise UsageError(f"--wandb-run: {args.wandb_run} logged no tokens_per_expert")
        return loads
    try:
        with open(args.loads) as f:
            loads = json.load(f)
    except (OSError, ValueError) as err:
        raise UsageError(f"--loads: {args.loads}: {err}") from None
    if not (isinstance(loads, list) and loads and all(isinstance(row, list) and row for row in loads)
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0 for row in loads for x in row)):
        raise UsageError("--loads: expected a JSON list of layers, each a non-empty list of non-negative token counts")
    if len({len(row) for row in loads}) != 1:
        raise UsageError("--loads: every layer must list the same number of experts")
    return loads


def main(argv: Optional[Sequence[str]] = None) -> None:
    from megatron_dsv3.inference.eplb import place_layers

    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--loads", help="JSON file: [layers][experts] token counts")
    parser.add_argument("--wandb-run", help="an offline wandb run folder of dsv3-pretrain")
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, required=True)
    parser.add_argument("--redundant", type=int, default=0, help="extra expert slots in all (divided over nodes)")
    parser.add_argument("--groups", type=int, default=1, help="expert groups of node-limited routing (n_group)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    with exit_on_usage_error(PROG):
        loads = _read_loads(args)
        try:
            report = place_layers(loads, groups=args.groups, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                                  redundant=args.redundant)
        except ValueError as err:
            raise UsageError(f"--nodes/--gpus-per-node/--redundant/--groups: {err}") from None
    print(json.dumps(report))


if __name__ == "__main__":
    main()
