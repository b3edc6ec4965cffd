"""Model chunks for DualPipe and DualPipeV: two pipeline stages per rank, built as megatron-core GPTModels.

DualPipe: rank r holds stage r of the model (chunk 0) and a mirror copy of stage P-1-r (chunk 1), which the
reversed micro-batch stream uses; mirror copies start equal and their gradients are summed, so they stay equal.
DualPipeV: 2P stages in a V, rank r holds stages r (chunk 0) and 2P-1-r (chunk 1), one copy of everything.
Either way the rank that runs a path's last stage also holds a first stage, so the MTP module's embedding copy
is tied to that chunk's embedding locally (gradients summed on the rank) instead of megatron-core's cross-stage
embedding all-reduce; each chunk keeps its own parameters, so each can be wrapped in megatron-core's DDP.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.utils import unwrap_model

from megatron_dsv3.config import DSV3Config
from megatron_dsv3.model.builder import build_model
from megatron_dsv3.training.init import init_layout_independent


@dataclass(frozen=True)
class StageGroup:
    """A stand-in pipeline group for building one stage: megatron-core reads the stage index and count from it."""

    stage: int
    stages: int

    def rank(self) -> int:
        return self.stage

    def size(self) -> int:
        return self.stages


def chunk_stages(schedule: str, rank: int, ranks: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(stage, number of stages) of chunk 0 and chunk 1 on `rank`."""
    if schedule == "dualpipe":
        return (rank, ranks), (ranks - 1 - rank, ranks)
    if schedule == "dualpipev":
        return (rank, 2 * ranks), (2 * ranks - 1 - rank, 2 * ranks)
    raise ValueError(f"--pipeline-schedule: {schedule!r} does not place two chunks per rank")


def build_stage(cfg: DSV3Config, stage: int, stages: int, *, seed: int, backend=None, **mcore_overrides):
    """A GPTModel holding layers of `stage` out of `stages`, initialised from (seed, global tensor names)."""
    staged = cfg.replace(pipeline_model_parallel_size=stages)
    pg = ProcessGroupCollection.use_mpu_process_groups()
    pg.pp = StageGroup(stage, stages)
    pg.embd = None  # no cross-stage embedding sync: the dual placement ties the copies on one rank
    saved = (parallel_state._MPU_PIPELINE_MODEL_PARALLEL_RANK, parallel_state._MPU_PIPELINE_MODEL_PARALLEL_WORLD_SIZE)
    parallel_state.set_pipeline_model_parallel_rank(stage)
    parallel_state.set_pipeline_model_parallel_world_size(stages)
    try:
        model = build_model(staged, backend, pre_process=stage == 0, post_process=stage == stages - 1,
                            pg_collection=pg, **mcore_overrides)
        init_layout_independent(model, seed)
    finally:
        parallel_state.set_pipeline_model_parallel_rank(saved[0])
        parallel_state.set_pipeline_model_parallel_world_size(saved[1])
    model.dsv3_stage = (stage, stages)
    return model


def build_chunks(cfg: DSV3Config, schedule: str, *, seed: int, backend=None, **mcore_overrides) -> list:
    """This rank's two chunks. DualPipe's mirror copies are marked `shared`, so the gradient norm counts
    every stage once (megatron-core's `param_is_not_shared`), and `dsv3_mirror`, so checkpoints store it once."""
    rank = parallel_state.get_pipeline_model_parallel_rank()
    ranks = parallel_state.get_pipeline_model_parallel_world_size()
    chunks = [build_stage(cfg, s, n, seed=seed, backend=backend, **mcore_overrides)
              for s, n in chunk_stages(schedule, rank, ranks)]
    if schedule == "dualpipe":
        chunks[1].dsv3_mirror = True  # checkpoints: a replica of the partner's chunk 0
        for p in chunks[1].parameters():
            p.shared = True
    return chunks


def _grad(p: torch.nn.Parameter) -> torch.Tensor:
    return p.main_grad if hasattr(p, "main_grad") else p.grad


@torch.no_grad()
def tie_embedding_grads(chunks) -> None:
    """Sum the gradients of the two embedding copies on this rank (first stage's and the MTP module's)."""
    tables = [unwrap_model(c).embedding.word_embeddings.weight for c in chunks
              if getattr(unwrap_model(c), "embedding", None) is not None]
    if len(tables) == 2 and all(_grad(t) is not None for t in tables):
        total = _grad(tables[0]) + _grad(tables[1])
        for t in tables:
            _grad(t).copy_(total)


def mirror_partner(schedule: str) -> int | None:
    """The pipeline rank holding the mirror copies of this rank's chunks (DualPipe only)."""
    if schedule != "dualpipe":
        return None
    return parallel_state.get_pipeline_model_parallel_world_size() - 1 - parallel_state.get_pipeline_model_parallel_rank()


def mirror_state(chunk) -> list[torch.Tensor]:
    """What DualPipe sums between mirror copies: every gradient and every router's token counts."""
    from megatron_dsv3.moe.balancing import biased_routers

    grads = [_grad(p) for p in unwrap_model(chunk).parameters()]
    return [g for g in grads if g is not None] + [r.local_tokens_per_expert for r in biased_routers([chunk])]
