"""Pipeline schedules as per-rank op lists: 1F1B, ZB1P, DualPipe and DualPipeV.

One generator serves both the simulator (which times the ops) and the training executor (which runs them),
so the picture and the bubble numbers describe exactly what trains. A micro-batch follows a *path* of
(rank, chunk) stages; an op names the chunk and micro-batch it works on.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

SCHEDULES = ("1f1b", "zb1p", "dualpipe", "dualpipev")


@dataclass(frozen=True)
class Op:
    """F (forward), B (backward; input grads only when `split`), W (deferred weight grads of an earlier split B),
    or FB: the forward of (chunk, mb) overlapped with the full backward of (chunk2, mb2)."""

    kind: str
    chunk: int
    mb: int
    chunk2: int = -1
    mb2: int = -1
    split: bool = False


@dataclass(frozen=True)
class Plan:
    """A schedule: ops per rank and every micro-batch's path of (rank, chunk) stages (the last one computes the loss)."""

    name: str
    ranks: int
    microbatches: int
    ops: tuple[tuple[Op, ...], ...]
    paths: tuple[tuple[tuple[int, int], ...], ...]

    def stage_of(self, mb: int, rank: int, chunk: int) -> int:
        return self.paths[mb].index((rank, chunk))


def _check(name: str, ranks: int, microbatches: int) -> None:
    if name not in SCHEDULES:
        raise ValueError(f"--pipeline-schedule: expected one of {SCHEDULES}, got {name!r}")
    if ranks < 1 or microbatches < 1:
        raise ValueError(f"pipeline: ranks and micro-batches must be >= 1, got {ranks} and {microbatches}")
    if name == "dualpipe":
        if ranks % 2:
            raise ValueError(f"--pipeline-model-parallel-size: DualPipe needs an even number of ranks, got {ranks}")
        if microbatches % 2 or microbatches < 2 * ranks:
            raise ValueError(f"micro-batches: DualPipe feeds half from each end and needs an even count >= "
                             f"2 x pipeline ranks = {2 * ranks}, got {microbatches}")
    if name == "dualpipev" and microbatches < 2 * ranks:
        raise ValueError(f"micro-batches: DualPipeV needs at least 2 x pipeline ranks = {2 * ranks}, "
                         f"got {microbatches}")
    if name in ("1f1b", "zb1p") and microbatches < ranks:
        raise ValueError(f"micro-batches: {name} needs at least as many micro-batches as ranks ({ranks}), "
                         f"got {microbatches}")


def one_f_one_b(ranks: int, microbatches: int) -> Plan:
    """1F1B: rank r runs ranks-1-r warm-up forwards, then alternates one forward and one full backward."""
    ops = []
    for r in range(ranks):
        warmup = min(ranks - 1 - r, microbatches)
        seq = [Op("F", 0, m) for m in range(warmup)]
        for i in range(microbatches):
            if warmup + i < microbatches:
                seq.append(Op("F", 0, warmup + i))
            seq.append(Op("B", 0, i))
        ops.append(tuple(seq))
    path = tuple((r, 0) for r in range(ranks))
    return Plan("1f1b", ranks, microbatches, tuple(ops), (path,) * microbatches)


def zero_bubble_1p(ranks: int, microbatches: int, f: float = 1.0, b: float = 2.0, w: float = 1.0) -> Plan:
    """ZB1P (ZB-H1): backward split into input grads (B) and weight grads (W); each rank, whenever free, runs
    an available B first, else a forward while it holds fewer than ranks-r activations (1F1B's memory),
    else a pending W. The order is fixed by list-scheduling these rules once with costs (f, b, w)."""
    free = [0.0] * ranks
    fwd_done: dict[tuple[int, int], float] = {}
    bwd_done: dict[tuple[int, int], float] = {}
    next_f, next_b = [0] * ranks, [0] * ranks
    pending_w: list[list[int]] = [[] for _ in range(ranks)]
    ops: list[list[Op]] = [[] for _ in range(ranks)]
    total = 3 * ranks * microbatches
    while sum(len(o) for o in ops) < total:
        best = None  # (start, priority, rank, op)
        for r in range(ranks):
            choices = []
            m = next_b[r]
            if m < next_f[r] and (r == ranks - 1 or (r + 1, m) in bwd_done):
                ready = [fwd_done[(r, m)]] + ([bwd_done[(r + 1, m)]] if r < ranks - 1 else [])
                choices.append((max([free[r]] + ready), 0, Op("B", 0, m, split=True)))
            m = next_f[r]
            if m < microbatches and next_f[r] - next_b[r] < ranks - r and (r == 0 or (r - 1, m) in fwd_done):
                choices.append((max(free[r], fwd_done.get((r - 1, m), 0.0)), 1, Op("F", 0, m)))
            if pending_w[r]:
                choices.append((free[r], 2, Op("W", 0, pending_w[r][0])))
            for start, prio, op in choices:
                # Prefer the earliest start; on a rank, a B or F that is ready no later beats a W.
                key = (start, prio, r)
                if best is None or key < best[0]:
                    best = (key, op)
        (start, _, r), op = best
        cost = {"F": f, "B": b - w, "W": w}[op.kind]
        free[r] = start + cost
        if op.kind == "F":
            fwd_done[(r, op.mb)] = free[r]
            next_f[r] += 1
        elif op.kind == "B":
            bwd_done[(r, op.mb)] = free[r]
            next_b[r] += 1
            pending_w[r].append(op.mb)
        else:
            pending_w[r].pop(0)
        ops[r].append(op)
    path = tuple((r, 0) for r in range(ranks))
    return Plan("zb1p", ranks, microbatches, tuple(tuple(o) for o in ops), (path,) * microbatches)


def _dual_rank_ops(half_rank: int, half_ranks: int, per_phase: int, phase_mbs: tuple[list[int], list[int]],
                   center: bool) -> tuple[Op, ...]:
    """One rank's DualPipe order; phase 0 is the chunk where this rank is early in the path, phase 1 late.

    The eight steps follow the DualPipe figure: warm-up forwards of phase 0, interleaved F0/F1, zero-bubble
    B1-W1-F1, the overlapped F&B main loop, B1 with F1&B0, the B1/B0 drain (its later half deferring weight
    grads), then W-B0 and the remaining Ws.
    """
    h, H, n = half_rank, half_ranks, per_phase
    nxt = {0: iter(phase_mbs[0]), 1: iter(phase_mbs[1])}
    back = {0: iter(phase_mbs[0]), 1: iter(phase_mbs[1])}
    f = lambda p: Op("F", p, next(nxt[p]))  # noqa: E731
    b = lambda p, split=False: Op("B", p, next(back[p]), split=split)  # noqa: E731
    w_queue: list[Op] = []
    seq: list[Op] = []

    def backward(p: int, split: bool):
        op = b(p, split)
        seq.append(op)
        if split:
            w_queue.append(Op("W", op.chunk, op.mb))

    def fb(pf: int, pb: int):
        fwd, bwd = next(nxt[pf]), next(back[pb])
        seq.append(Op("FB", pf, fwd, pb, bwd))

    seq += [f(0) for _ in range(2 * (H - h - 1))]                       # 1: nF0
    for _ in range(h + 1):                                               # 2: nF0F1
        seq += [f(0), f(1)]
    for _ in range(H - h - 1):                                           # 3: nB1W1F1
        backward(1, split=True)
        seq.append(w_queue.pop(0))
        seq.append(f(1))
    for i in range(n - 2 * H + h + 1):                                   # 4: nF0B1F1B0 (main)
        if i == 0 and center:  # the centre ranks hand F0 to their neighbour before backward: no overlap
            seq.append(f(0))
            backward(1, split=False)
        else:
            fb(0, 1)
        fb(1, 0)
    for _ in range(H - h - 1):                                           # 5: nB1F1B0
        backward(1, split=False)
        fb(1, 0)
    zb = False
    for i in range(h + 1):                                               # 6: nB1B0
        if i == (h + 1) // 2 and h % 2 == 1:
            zb = True
        backward(1, zb)
        if i == (h + 1) // 2 and h % 2 == 0:
            zb = True
        backward(0, zb)
    for _ in range(H - h - 1):                                           # 7: nWB0
        seq.append(w_queue.pop(0))
        backward(0, split=True)
    seq += [w_queue.pop(0) for _ in range(h + 1)]                        # 8: nW
    assert not w_queue
    return tuple(seq)


def dualpipe(ranks: int, microbatches: int) -> Plan:
    """DualPipe: half the micro-batches enter at rank 0 (chunk 0 = stage r), half at the last rank
    (chunk 1 = stage ranks-1-r, a mirror copy); rank r pairs a forward of one direction with a backward of the other."""
    _check("dualpipe", ranks, microbatches)
    n, H = microbatches // 2, ranks // 2
    down = tuple((r, 0) for r in range(ranks))
    up = tuple((ranks - 1 - s, 1) for s in range(ranks))
    paths = (down,) * n + (up,) * n
    ops = []
    for r in range(ranks):
        first_half = r < H
        h = r if first_half else ranks - 1 - r
        own = (list(range(n)), list(range(n, 2 * n)))  # micro-batches whose path runs through chunk 0, 1
        seq = _dual_rank_ops(h, H, n, own if first_half else own[::-1], center=h == H - 1)
        if not first_half:  # local phase 0 is global chunk 1 on the second half: relabel
            seq = tuple(_swap_chunks(op) for op in seq)
        ops.append(seq)
    return Plan("dualpipe", ranks, microbatches, tuple(ops), paths)


def dualpipev(ranks: int, microbatches: int) -> Plan:
    """DualPipeV: DualPipe cut in half: 2 x ranks stages in a V (rank r holds stages r and 2*ranks-1-r),
    every micro-batch goes down through chunk 0 and back up through chunk 1; one parameter copy."""
    _check("dualpipev", ranks, microbatches)
    path = tuple((r, 0) for r in range(ranks)) + tuple((ranks - 1 - r, 1) for r in range(ranks))
    mbs = list(range(microbatches))
    ops = tuple(_dual_rank_ops(r, ranks, microbatches, (mbs, mbs), center=r == ranks - 1) for r in range(ranks))
    return Plan("dualpipev", ranks, microbatches, ops, (path,) * microbatches)


def _swap_chunks(op: Op) -> Op:
    return Op(op.kind, 1 - op.chunk, op.mb, (1 - op.chunk2) if op.chunk2 >= 0 else -1, op.mb2, op.split)


@lru_cache(maxsize=64)
def build(name: str, ranks: int, microbatches: int) -> Plan:
    """The named schedule for `ranks` pipeline ranks and `microbatches` micro-batches (validated; a Plan is
    immutable, so training builds it once rather than every step)."""
    _check(name, ranks, microbatches)
    if name == "1f1b":
        return one_f_one_b(ranks, microbatches)
    if name == "zb1p":
        return zero_bubble_1p(ranks, microbatches)
    return dualpipe(ranks, microbatches) if name == "dualpipe" else dualpipev(ranks, microbatches)


def bubble_formula(name: str, ranks: int, f: float, b: float, w: float, fb: Optional[float] = None) -> float:
    """Report Table 2 (F forward, B full backward, W its weight part, FB an overlapped pair); DualPipeV is
    DualPipe cut in half, so its `ranks` devices carry the bubble of DualPipe on 2 x ranks."""
    fb = f + b if fb is None else fb
    return {"1f1b": (ranks - 1) * (f + b), "zb1p": (ranks - 1) * (f + b - 2 * w),
            "dualpipe": (ranks / 2 - 1) * (fb + b - 3 * w), "dualpipev": (ranks - 1) * (fb + b - 3 * w)}[name]
