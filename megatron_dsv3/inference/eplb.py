"""Redundant-expert placement for inference load balance (DeepSeek-V3 report, section 3.4).

Given per-expert loads of one MoE layer, a cluster of `nodes` x `gpus_per_node` GPUs and `redundant` extra
expert slots, place every expert and its replicas so that the busiest GPU carries as little as possible:

1. groups to nodes: the expert groups of node-limited routing stay whole on one node (so a token still reaches
   at most topk_group nodes); groups go, heaviest first, to the least-loaded node with room (when the nodes
   do not divide the groups, as in a 40-node decode unit, all GPUs form one pool);
2. replicas within a node: each node's share of the redundant slots goes, one at a time, to the expert whose
   load per replica is highest (a replica takes an equal part of its expert's tokens);
3. replicas to GPUs: heaviest replica first onto the least-loaded GPU of the node with a free slot.

Every GPU ends with the same number of slots, (experts + redundant) / GPUs.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass


@dataclass(frozen=True)
class Placement:
    """One layer's placement: `gpus[g]` lists the logical experts whose replicas GPU g hosts."""

    gpus: tuple[tuple[int, ...], ...]
    replicas: tuple[int, ...]  # replicas[e]: how many copies of expert e exist (>= 1)

    def gpu_loads(self, loads) -> list[float]:
        """Tokens each GPU computes when every expert's tokens are split evenly over its replicas."""
        return [sum(loads[e] / self.replicas[e] for e in experts) for experts in self.gpus]


def balance(gpu_loads) -> float:
    """max / mean GPU load (1.0 is perfect balance; 1.0 for an idle layer)."""
    mean = sum(gpu_loads) / len(gpu_loads)
    return max(gpu_loads) / mean if mean > 0 else 1.0


def contiguous(num_experts: int, num_gpus: int) -> Placement:
    """The default expert-parallel layout without redundancy: GPU g hosts experts g*E/G .. (g+1)*E/G - 1 (with
    more GPUs than experts, one expert each on the first E GPUs)."""
    per = max(1, num_experts // num_gpus)
    return Placement(tuple(tuple(range(min(g * per, num_experts), min((g + 1) * per, num_experts)))
                           for g in range(num_gpus)), (1,) * num_experts)


def _check(num_experts: int, groups: int, nodes: int, gpus_per_node: int, redundant: int) -> None:
    def fail(message: str):
        raise ValueError(f"placement: {message} (experts={num_experts}, groups={groups}, nodes={nodes}, "
                         f"gpus_per_node={gpus_per_node}, redundant={redundant})")

    if nodes <= 0 or gpus_per_node <= 0:
        fail("nodes and gpus_per_node must be positive")
    if num_experts <= 0 or groups <= 0 or num_experts % groups:
        fail("groups must divide the experts")
    if redundant < 0 or redundant % nodes:
        fail("redundant slots must be >= 0 and divide evenly over nodes")
    gpus = nodes * gpus_per_node
    if (num_experts + redundant) % gpus or num_experts + redundant < gpus:
        fail("experts + redundant slots must fill every GPU with the same number (>= 1) of slots")


def place(loads, *, groups: int, nodes: int, gpus_per_node: int, redundant: int) -> Placement:
    """Replicate and place one layer's experts (see the module docstring); `loads[e]` is expert e's tokens."""
    loads = [float(x) for x in loads]
    num_experts = len(loads)
    if nodes > 1 and groups % nodes:  # groups cannot stay whole on nodes (decode over 40 nodes): one pool
        return place(loads, groups=1, nodes=1, gpus_per_node=nodes * gpus_per_node, redundant=redundant)
    _check(num_experts, groups, nodes, gpus_per_node, redundant)
    per_group = num_experts // groups
    group_load = [sum(loads[g * per_group:(g + 1) * per_group]) for g in range(groups)]
    groups_per_node = groups // nodes
    node_groups: list[list[int]] = [[] for _ in range(nodes)]
    node_load = [0.0] * nodes
    for g in sorted(range(groups), key=lambda g: -group_load[g]):
        n = min((n for n in range(nodes) if len(node_groups[n]) < groups_per_node), key=lambda n: node_load[n])
        node_groups[n].append(g)
        node_load[n] += group_load[g]

    replicas = [1] * num_experts
    slots = (num_experts + redundant) // (nodes * gpus_per_node)
    gpus: list[tuple[int, ...]] = []
    for n in range(nodes):
        experts = [g * per_group + i for g in sorted(node_groups[n]) for i in range(per_group)]
        heap = [(-loads[e], e) for e in experts]  # load per replica, as a max-heap
        heapq.heapify(heap)
        for _ in range(redundant // nodes):
            _, e = heapq.heappop(heap)
            replicas[e] += 1
            heapq.heappush(heap, (-loads[e] / replicas[e], e))
        items = sorted(((loads[e] / replicas[e], e) for e in experts for _ in range(replicas[e])), reverse=True)
        hosted: list[list[int]] = [[] for _ in range(gpus_per_node)]
        carried = [0.0] * gpus_per_node
        for share, e in items:
            g = min((g for g in range(gpus_per_node) if len(hosted[g]) < slots), key=lambda g: carried[g])
            hosted[g].append(e)
            carried[g] += share
        gpus += [tuple(h) for h in hosted]
    return Placement(tuple(gpus), tuple(replicas))


def place_layers(loads_per_layer, *, groups: int, nodes: int, gpus_per_node: int, redundant: int) -> dict:
    """Placements for every layer, with max/mean GPU load before (contiguous, no redundancy) and after."""
    report = []
    for layer, loads in enumerate(loads_per_layer):
        after = place(loads, groups=groups, nodes=nodes, gpus_per_node=gpus_per_node, redundant=redundant)
        before = contiguous(len(loads), nodes * gpus_per_node)
        report.append({"layer": layer, "balance_before": balance(before.gpu_loads(loads)),
                       "balance_after": balance(after.gpu_loads(loads)),
                       "replicas": list(after.replicas), "gpus": [list(g) for g in after.gpus]})
    return {"nodes": nodes, "gpus_per_node": gpus_per_node, "redundant": redundant, "groups": groups,
            "layers": report}
