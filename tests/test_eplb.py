"""Redundant-expert placement: valid by construction, better than no redundancy, near a brute-force optimum,
and a model served through it computes what the unreplicated model computes."""
import itertools
import json
import random

import pytest
import torch

from megatron_dsv3.inference.eplb import balance, contiguous, place, place_layers

CASES = [(16, 4, 2, 2, 4), (32, 8, 4, 2, 8), (16, 4, 1, 4, 0), (8, 8, 4, 4, 8), (256, 8, 4, 8, 32),
         (256, 8, 40, 8, 64)]


def _skewed(n: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [rng.paretovariate(1.2) * 100 for _ in range(n)]


@pytest.mark.parametrize("experts,groups,nodes,gpus_per_node,redundant", CASES,
                         ids=[f"E{e}-G{g}-N{n}x{p}-R{r}" for e, g, n, p, r in CASES])
def test_placement_is_valid_and_lowers_the_busiest_gpu(experts, groups, nodes, gpus_per_node, redundant):
    for seed in range(5):
        loads = _skewed(experts, seed)
        placed = place(loads, groups=groups, nodes=nodes, gpus_per_node=gpus_per_node, redundant=redundant)
        slots = (experts + redundant) // (nodes * gpus_per_node)
        assert len(placed.gpus) == nodes * gpus_per_node and all(len(g) == slots for g in placed.gpus)
        hosted = [e for g in placed.gpus for e in g]
        assert sorted(set(hosted)) == list(range(experts))  # every expert somewhere
        assert [hosted.count(e) for e in range(experts)] == list(placed.replicas)
        assert sum(placed.replicas) == experts + redundant
        if groups % nodes == 0:  # node-limited routing: a group lives on exactly one node
            per_group = experts // groups
            for g in range(groups):
                homes = {gpu // gpus_per_node for gpu, held in enumerate(placed.gpus) for e in held
                         if e // per_group == g}
                assert len(homes) == 1
        total = sum(placed.gpu_loads(loads))
        assert total == pytest.approx(sum(loads))  # replicas split tokens, none lost or doubled
        before = balance(contiguous(experts, nodes * gpus_per_node).gpu_loads(loads))
        assert balance(placed.gpu_loads(loads)) <= before + 1e-9
        if redundant:
            assert balance(placed.gpu_loads(loads)) < before


def _optimum(loads, gpus: int, redundant: int) -> float:
    """Brute force over replica counts and assignments of replicas to GPUs (one node, no groups)."""
    experts, slots = len(loads), (len(loads) + redundant) // gpus
    best = float("inf")
    for extra in itertools.product(range(redundant + 1), repeat=experts):
        if sum(extra) != redundant:
            continue
        replicas = [1 + x for x in extra]
        items = [e for e in range(experts) for _ in range(replicas[e])]
        for assignment in set(itertools.permutations(items)):
            gpu_loads = [sum(loads[e] / replicas[e] for e in assignment[g * slots:(g + 1) * slots])
                         for g in range(gpus)]
            best = min(best, max(gpu_loads))
    return best


@pytest.mark.parametrize("seed", range(4))
def test_placement_is_near_the_brute_force_optimum(seed):
    loads = _skewed(4, seed)
    placed = place(loads, groups=1, nodes=1, gpus_per_node=2, redundant=2)
    optimum = _optimum(loads, 2, 2)
    assert max(placed.gpu_loads(loads)) <= optimum * 1.25
    assert max(placed.gpu_loads(loads)) < max(contiguous(4, 2).gpu_loads(loads))


def test_cli_prints_before_and_after_per_layer(tmp_path, capsys):
    from megatron_dsv3.inference.eplb_cli import main

    loads = [_skewed(16, 1), _skewed(16, 2)]
    (tmp_path / "loads.json").write_text(json.dumps(loads))
    main(["--loads", str(tmp_path / "loads.json"), "--nodes", "2", "--gpus-per-node", "2", "--redundant", "4",
          "--groups", "4"])
    report = json.loads(capsys.readouterr().out)
    assert report == place_layers(loads, groups=4, nodes=2, gpus_per_node=2, redundant=4)
    assert all(layer["balance_after"] < layer["balance_before"] for layer in report["layers"])
    with pytest.raises(SystemExit) as exc:
        main(["--loads", str(tmp_path / "loads.json"), "--nodes", "3", "--gpus-per-node", "2"])
    assert exc.value.code == 2 and "dsv3-eplb: error: --nodes" in capsys.readouterr().err


def test_a_model_served_through_replicas_computes_the_same(runtime):
    import megatron_dsv3 as m
    from megatron_dsv3.inference.replicas import apply_placement, moe_layers
    from megatron_dsv3.model.init import init_layout_independent

    cfg = m.presets.get_preset("tiny")
    model = m.build_model(cfg, backend="local").eval()
    init_layout_independent(model, 5)
    ids = torch.randint(0, cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(48).expand(2, 48)
    with torch.no_grad():
        plain = model(ids, pos, None)
    experts = cfg.n_routed_experts
    loads = [[100.0] + [1.0] * (experts - 1)] * len(moe_layers(model))  # expert 0 is hot: it gets replicas
    placements = [place(l, groups=cfg.n_group, nodes=1, gpus_per_node=4, redundant=4) for l in loads]
    assert all(p.replicas[0] > 1 for p in placements)
    wrappers = apply_placement(model, placements)
    with torch.no_grad():
        served = model(ids, pos, None)
    assert torch.allclose(served, plain, atol=1e-6, rtol=0)
    for wrapper, placement in zip(wrappers, placements):
        hot = [int(wrapper.tokens_per_slot[s]) for s in wrapper.slots_of[0]]
        assert len(hot) == placement.replicas[0] and max(hot) - min(hot) <= 1 and sum(hot) > 0
