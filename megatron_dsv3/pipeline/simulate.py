"""Time a pipeline schedule with given op costs: bubbles, makespan, activation peaks, and a Figure-5 style picture.

    python -m megatron_dsv3.pipeline.simulate --schedule dualpipe --pp 8 --microbatches 20 \\
        --f 1 --b 2 --w 1 --fb 3 --json --plot dualpipe.png
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

from megatron_dsv3.pipeline.schedule import SCHEDULES, Op, Plan, bubble_formula, build


@dataclass(frozen=True)
class Costs:
    f: float
    b: float
    w: float
    fb: float

    def of(self, op: Op) -> float:
        return {"F": self.f, "B": self.b - self.w if op.split else self.b, "W": self.w, "FB": self.fb}[op.kind]


@dataclass(frozen=True)
class Timeline:
    """Start and end of every op, per rank, in schedule order."""

    plan: Plan
    spans: tuple[tuple[tuple[float, float], ...], ...]

    @property
    def makespan(self) -> float:
        return max((s[-1][1] for s in self.spans if s), default=0.0)

    def busy(self, rank: int) -> float:
        return sum(end - start for start, end in self.spans[rank])

    def bubble_per_rank(self) -> list[float]:
        return [self.makespan - self.busy(r) for r in range(self.plan.ranks)]

    def peak_activations(self) -> list[int]:
        """Micro-batch activations held at once per rank (a forward's inputs live until its backward ends)."""
        peaks = []
        for ops in self.plan.ops:
            live = peak = 0
            for op in ops:
                live += op.kind in ("F", "FB")
                peak = max(peak, live)
                live -= op.kind in ("B", "FB")
            peaks.append(peak)
        return peaks


def _deps(plan: Plan, rank: int, op: Op) -> list[tuple[str, int, int]]:
    """(kind, mb, stage) results an op waits for: the previous stage's forward, the next stage's backward."""
    needs = []
    parts = [("F", op.chunk, op.mb)] if op.kind in ("F", "FB") else []
    parts += [("B", op.chunk2, op.mb2)] if op.kind == "FB" else [("B", op.chunk, op.mb)] if op.kind == "B" else []
    for kind, chunk, mb in parts:
        stage = plan.stage_of(mb, rank, chunk)
        if kind == "F" and stage > 0:
            needs.append(("F", mb, stage - 1))
        if kind == "B":
            needs.append(("F", mb, stage))
            if stage < len(plan.paths[mb]) - 1:
                needs.append(("B", mb, stage + 1))
    return needs


def simulate(plan: Plan, costs: Costs) -> Timeline:
    """Run every rank's ops in order, each starting when its rank is free and its inputs have arrived."""
    done: dict[tuple[str, int, int], float] = {}
    cursor = [0] * plan.ranks
    clock = [0.0] * plan.ranks
    spans: list[list[tuple[float, float]]] = [[] for _ in range(plan.ranks)]
    remaining = sum(len(o) for o in plan.ops)
    while remaining:
        progressed = False
        for r in range(plan.ranks):
            while cursor[r] < len(plan.ops[r]):
                op = plan.ops[r][cursor[r]]
                needs = _deps(plan, r, op)
                if any(n not in done for n in needs):
                    break
                start = max([clock[r]] + [done[n] for n in needs])
                end = start + costs.of(op)
                spans[r].append((start, end))
                clock[r] = end
                for kind, chunk, mb in ([("F", op.chunk, op.mb)] if op.kind in ("F", "FB") else []) + \
                        ([("B", op.chunk2, op.mb2)] if op.kind == "FB" else []) + \
                        ([("B", op.chunk, op.mb)] if op.kind == "B" else []):
                    done[(kind, mb, plan.stage_of(mb, r, chunk))] = end
                cursor[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = {r: plan.ops[r][cursor[r]] for r in range(plan.ranks) if cursor[r] < len(plan.ops[r])}
            raise RuntimeError(f"schedule {plan.name} deadlocks: waiting ops {stuck}")
    return Timeline(plan, tuple(tuple(s) for s in spans))


def report(name: str, pp: int, microbatches: int, costs: Costs) -> dict:
    """The JSON the CLI prints: bubbles, makespan, activation peaks, parameter copies, the formula's bubble."""
    timeline = simulate(build(name, pp, microbatches), costs)
    per_rank = timeline.bubble_per_rank()
    return {
        "schedule": name, "pp": pp, "microbatches": microbatches,
        "bubble": max(per_rank), "bubble_per_rank": per_rank, "makespan": timeline.makespan,
        "formula_bubble": bubble_formula(name, pp, costs.f, costs.b, costs.w, costs.fb),
        "peak_activations_per_rank": timeline.peak_activations(),
        "parameter_copies": 2 if name in ("dualpipe", "dualpipev") else 1,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m megatron_dsv3.pipeline.simulate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schedule", choices=SCHEDULES, required=True)
    parser.add_argument("--pp", type=int, required=True, help="pipeline ranks (devices)")
    parser.add_argument("--microbatches", type=int, required=True)
    parser.add_argument("--f", type=float, default=1.0, help="forward chunk time")
    parser.add_argument("--b", type=float, default=2.0, help="full backward chunk time")
    parser.add_argument("--w", type=float, default=1.0, help="weight-gradient part of the backward")
    parser.add_argument("--fb", type=float, default=None, help="overlapped forward+backward pair (default f+b)")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON line")
    parser.add_argument("--plot", default=None, help="write the schedule picture to this PNG")
    args = parser.parse_args(argv)
    costs = Costs(args.f, args.b, args.w, args.f + args.b if args.fb is None else args.fb)
    try:
        result = report(args.schedule, args.pp, args.microbatches, costs)
    except ValueError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    if args.plot:
        from megatron_dsv3.pipeline.picture import draw

        draw(simulate(build(args.schedule, args.pp, args.microbatches), costs), args.plot)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.schedule}: bubble {result['bubble']:g} (formula {result['formula_bubble']:g}), "
              f"makespan {result['makespan']:g}, peak activations {max(result['peak_activations_per_rank'])}, "
              f"parameter copies {result['parameter_copies']}")


if __name__ == "__main__":
    main(sys.argv[1:])
