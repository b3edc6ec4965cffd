"""Pipeline schedules against the report's Table 2 formulas, and their structural invariants."""
import json
import random
import subprocess
import sys
from collections import Counter

import pytest

from megatron_dsv3.pipeline.schedule import bubble_formula, build
from megatron_dsv3.pipeline.simulate import Costs, report, simulate
from tests.distributed import REPO

TABLE2 = Costs(f=1, b=2, w=1, fb=3)


def test_report_table_2_example():
    got = {s: report(s, 8, 20, TABLE2)["bubble"] for s in ("1f1b", "zb1p", "dualpipe")}
    assert got == {"1f1b": 21, "zb1p": 7, "dualpipe": 6}


@pytest.mark.parametrize("pp", [2, 4, 6, 8, 10, 16])
@pytest.mark.parametrize("extra", [0, 1, 7])
def test_bubbles_equal_the_formulas_for_even_pp(pp, extra):
    for name, c in (("1f1b", pp + extra), ("zb1p", pp + extra), ("dualpipe", 2 * pp + 2 * extra)):
        r = report(name, pp, c, TABLE2)
        assert r["bubble"] == pytest.approx(bubble_formula(name, pp, 1, 2, 1, 3)), name
    dual = report("dualpipe", pp, 2 * pp + 2 * extra, TABLE2)
    assert max(dual["peak_activations_per_rank"]) == pp + 1
    assert dual["parameter_copies"] == 2


def test_dualpipe_bubble_never_exceeds_the_formula_when_backward_is_at_least_twice_forward():
    rng = random.Random(0)
    for _ in range(150):
        name = rng.choice(["dualpipe", "dualpipev"])
        pp = rng.choice([2, 4, 6, 8]) if name == "dualpipe" else rng.choice([2, 3, 4])
        per = rng.randint(pp, 3 * pp) if name == "dualpipe" else rng.randint(2 * pp, 4 * pp)
        f = rng.uniform(0.5, 2.0)
        b = f * rng.uniform(2.0, 3.0)
        w = b * rng.uniform(0.2, 0.5)
        costs = Costs(f, b, w, rng.uniform(b, f + b))
        r = report(name, pp, 2 * per if name == "dualpipe" else per, costs)
        assert r["bubble"] <= r["formula_bubble"] + 1e-9, (name, pp, costs)


@pytest.mark.parametrize("name,pp,c", [("1f1b", 4, 9), ("zb1p", 4, 9), ("dualpipe", 4, 10), ("dualpipev", 3, 7)])
def test_every_stage_runs_every_microbatch_forward_backward_and_weight_once(name, pp, c):
    plan = build(name, pp, c)
    per_stage = Counter()
    for rank, ops in enumerate(plan.ops):
        for op in ops:
            parts = [("F", op.chunk, op.mb), ("B", op.chunk2, op.mb2)] if op.kind == "FB" else [(op.kind, op.chunk, op.mb)]
            for kind, chunk, mb in parts:
                per_stage[(kind, mb, plan.stage_of(mb, rank, chunk))] += 1
            if op.kind == "B" and op.split:
                assert any(o.kind == "W" and (o.chunk, o.mb) == (op.chunk, op.mb) for o in ops)
    for mb, path in enumerate(plan.paths):
        for stage in range(len(path)):
            assert per_stage[("F", mb, stage)] == 1 and per_stage[("B", mb, stage)] == 1
    simulate(plan, TABLE2)  # no deadlock


def test_dualpipe_feeds_both_ends_and_dualpipev_is_a_v():
    plan = build("dualpipe", 4, 8)
    assert {p[0] for p in plan.paths} == {(0, 0), (3, 1)}
    v = build("dualpipev", 3, 6)
    assert v.paths[0] == ((0, 0), (1, 0), (2, 0), (2, 1), (1, 1), (0, 1))


@pytest.mark.parametrize("name,pp,c,message", [
    ("dualpipe", 3, 12, "even number of ranks"), ("dualpipe", 4, 6, ">= 2 x pipeline ranks"),
    ("dualpipe", 4, 9, "even count"), ("dualpipev", 4, 7, "at least 2 x pipeline ranks"),
    ("1f1b", 4, 3, "at least as many micro-batches"), ("gpipe", 4, 8, "--pipeline-schedule"),
])
def test_invalid_settings_raise_clear_errors(name, pp, c, message):
    with pytest.raises(ValueError, match=message):
        build(name, pp, c)


def test_cli_json_and_plot(tmp_path):
    png = tmp_path / "dp.png"
    result = subprocess.run([sys.executable, "-m", "megatron_dsv3.pipeline.simulate", "--schedule", "dualpipe",
                             "--pp", "8", "--microbatches", "20", "--f", "1", "--b", "2", "--w", "1", "--fb", "3",
                             "--json", "--plot", str(png)], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert data["bubble"] == 6 and data["makespan"] > 0 and len(data["bubble_per_rank"]) == 8
    assert data["peak_activations_per_rank"] == [9] * 8 and data["parameter_copies"] == 2
    assert png.stat().st_size > 10_000
    bad = subprocess.run([sys.executable, "-m", "megatron_dsv3.pipeline.simulate", "--schedule", "dualpipe",
                          "--pp", "3", "--microbatches", "12"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert bad.returncode == 2 and "even number of ranks" in bad.stderr and "Traceback" not in bad.stderr
