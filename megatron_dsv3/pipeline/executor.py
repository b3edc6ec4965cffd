"""Run one rank's share of a pipeline `Plan`: its ops in order, activations and gradients over point-to-point.

The stage work is pluggable (`StageWork`): the bubble benchmark plugs in timed sleeps, training plugs in
model chunks. Sends are asynchronous and receives block, so a plan that the simulator can run without
deadlock runs here too; every message is tagged by (micro-batch, stage, direction) so none can be mismatched.
"""
from __future__ import annotations

from typing import Optional, Protocol

import torch
import torch.distributed as dist

from megatron_dsv3 import runtime
from megatron_dsv3.pipeline.schedule import Op, Plan


class StageWork(Protocol):
    """What a rank computes for one stage of one micro-batch."""

    def forward(self, chunk: int, mb: int, stage: int, inputs: Optional[torch.Tensor]) -> torch.Tensor: ...

    def backward(self, chunk: int, mb: int, stage: int, grad: Optional[torch.Tensor],
                 split: bool) -> Optional[torch.Tensor]: ...

    def weight(self, chunk: int, mb: int, stage: int) -> None: ...

    # Optional: `pair(forward_args, backward_args) -> (output, input_grad)` runs an F&B pair's two halves,
    # e.g. concurrently; without it the executor runs forward then backward. `sent(chunk, mb)` is told when
    # a forward output has been handed to the next stage (it may free the output's data).


class Executor:
    """Runs `plan.ops[rank]`; `ranks` maps pipeline rank -> global rank; `shape` is the activation shape."""

    def __init__(self, plan: Plan, rank: int, work: StageWork, *, ranks: list[int], shape: tuple[int, ...],
                 dtype: torch.dtype = torch.float32, group=None, forward_only: bool = False):
        self.plan, self.rank, self.work, self.forward_only = plan, rank, work, forward_only
        self.global_ranks, self.shape, self.dtype, self.group = ranks, shape, dtype, group
        self._sends: list = []

    def _tag(self, kind: str, mb: int, stage: int) -> int:
        return ((mb * len(self.plan.paths[mb]) + stage) * 2 + (kind == "B")) + 1

    def _send(self, tensor: torch.Tensor, to_rank: int, kind: str, mb: int, stage: int) -> None:
        if to_rank == self.rank:
            self._local[(kind, mb, stage)] = tensor.detach().clone()
        else:
            work = dist.isend(tensor.detach().contiguous(), self.global_ranks[to_rank], group=self.group,
                              tag=self._tag(kind, mb, stage))
            self._sends.append(work)
        if kind == "F" and hasattr(self.work, "sent"):  # the sender's output now lives on in the message
            self.work.sent(self.plan.paths[mb][stage - 1][1], mb)

    def _recv(self, from_rank: int, kind: str, mb: int, stage: int) -> torch.Tensor:
        if from_rank == self.rank:
            return self._local.pop((kind, mb, stage))
        buf = torch.empty(self.shape, dtype=self.dtype, device=runtime.device())
        dist.recv(buf, self.global_ranks[from_rank], group=self.group, tag=self._tag(kind, mb, stage))
        return buf

    def _receive(self, kind: str, chunk: int, mb: int) -> tuple[int, Optional[torch.Tensor]]:
        """(stage index on the path, what the neighbour sent): activations for F, gradients for B."""
        path, stage = self.plan.paths[mb], self.plan.stage_of(mb, self.rank, chunk)
        if kind == "F":
            return stage, self._recv(path[stage - 1][0], "F", mb, stage) if stage > 0 else None
        return stage, self._recv(path[stage + 1][0], "B", mb, stage) if stage < len(path) - 1 else None

    def _owed(self, kind: str, mb: int, stage: int, tensor) -> list[tuple]:
        """The send a finished F (to the next stage) or B (to the previous stage) owes, if any."""
        path = self.plan.paths[mb]
        if kind == "F":
            return [(tensor, path[stage + 1][0], "F", mb, stage + 1)] if stage < len(path) - 1 else []
        return [(tensor, path[stage - 1][0], "B", mb, stage - 1)] if stage > 0 else []

    def _forward(self, chunk: int, mb: int) -> list[tuple]:
        stage, inputs = self._receive("F", chunk, mb)
        return self._owed("F", mb, stage, self.work.forward(chunk, mb, stage, inputs))

    def _backward(self, chunk: int, mb: int, split: bool) -> list[tuple]:
        stage, grad = self._receive("B", chunk, mb)
        return self._owed("B", mb, stage, self.work.backward(chunk, mb, stage, grad, split))

    def _pair(self, op: Op) -> list[tuple]:
        """An overlapped F&B pair: both inputs received first, the work may run the halves concurrently
        (`StageWork.pair`), both results delivered when the pair ends, as the schedule assumes."""
        f_stage, inputs = self._receive("F", op.chunk, op.mb)
        b_stage, grad = self._receive("B", op.chunk2, op.mb2)
        forward = (op.chunk, op.mb, f_stage, inputs)
        backward = (op.chunk2, op.mb2, b_stage, grad, False)
        if hasattr(self.work, "pair"):
            out, grad_in = self.work.pair(forward, backward)
        else:
            out, grad_in = self.work.forward(*forward), self.work.backward(*backward)
        return self._owed("F", op.mb, f_stage, out) + self._owed("B", op.mb2, b_stage, grad_in)

    def run(self) -> None:
        """Execute every op of this rank, then wait for the outstanding sends."""
        self._local: dict = {}
        for op in self.plan.ops[self.rank]:
            self.step(op)
        for work in self._sends:
            work.wait()
        self._sends.clear()

    def step(self, op: Op) -> None:
        if self.forward_only:  # evaluation: the forwards alone, in the schedule's order
            sends = self._forward(op.chunk, op.mb) if op.kind in ("F", "FB") else []
        elif op.kind == "F":
            sends = self._forward(op.chunk, op.mb)
        elif op.kind == "B":
            sends = self._backward(op.chunk, op.mb, op.split)
        elif op.kind == "W":
            self.work.weight(op.chunk, op.mb, self.plan.stage_of(op.mb, self.rank, op.chunk))
            sends = []
        else:
            sends = self._pair(op)
        for send in sends:
            self._send(*send)
