"""Model chunks for DualPipe and DualPipeV: two pipeline stages per rank, built as megatron-core GPTModels.

DualPipe: rank r holds stage r of the model (chunk 0) and a mirror copy of stage P-1-r (chunk 1), which the
reversed micro-batch stream uses; mirror copies start equal and their gradients are summed, so they stay equal.
DualPipeV: 2P stages in a V, rank r holds stages r (chunk 0) and 2P-1-r (chunk 1), one copy of everything.
Either way the rank that runs a path's last stage also holds a first stage, so the MTP module's embedding copy
is tied to that chunk's embedding locally (gradients summed on the rank) instead of megatron-core's cross-stage
embedding all-reduce; each chunk keeps its own parameters, so each can be wrapped in megatron-core's DDP.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import partial
from types import MethodType

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.utils import unwrap_model

from megatron_dsv3.config import DSV3Config
from megatron_dsv3.model.builder import build_model
from megatron_dsv3.pipeline.wgrad import enable_wgrad_deferral
from megatron_dsv3.model.init import init_layout_independent


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


# The groups a layer's forward and backward communicate on: attention/linear TP, the MoE dispatcher's token
# all-gather (tp_ep) and dispatch/combine all-to-all (ep), expert TP, the router's token gather (tp_cp).
LAYER_GROUPS = ("tp", "cp", "tp_cp", "ep", "tp_ep", "expt_tp")


def _clone_layer_groups(pg: ProcessGroupCollection) -> ProcessGroupCollection:
    """A copy of `pg` whose multi-rank layer groups are new communicators over the same ranks (collective).

    Chunk 1 talks on these, chunk 0 on megatron-core's own: an overlapped F&B pair runs one chunk's forward
    and the other's backward at once, and collectives on separate communicators cannot interleave wrongly."""
    clone = copy.copy(pg)
    for name in LAYER_GROUPS:
        group = getattr(pg, name, None)
        if group is None or group.size() == 1:
            continue
        members = [None] * dist.get_world_size()
        dist.all_gather_object(members, dist.get_process_group_ranks(group))
        every = sorted({tuple(m) for m in members})
        mine, _ = dist.new_subgroups_by_enumeration([list(m) for m in every])
        setattr(clone, name, mine)
    return clone


def chunks_communicate_apart(chunks) -> bool:
    """True when the two chunks' layers share no multi-rank communicator, so their work may run concurrently."""
    pgs = [getattr(unwrap_model(c), "pg_collection", None) for c in chunks]
    if any(pg is None for pg in pgs):
        return False
    for name in LAYER_GROUPS:
        a, b = (getattr(pg, name, None) for pg in pgs)
        if a is not None and a is b and a.size() > 1:
            return False
    return True


def build_stage(cfg: DSV3Config, stage: int, stages: int, *, seed: int, backend=None, own_groups: bool = False,
                **mcore_overrides):
    """A GPTModel holding layers of `stage` out of `stages`, initialised from (seed, global tensor names);
    with `own_groups` its layers communicate on their own clones of the layer groups."""
    staged = cfg.replace(pipeline_model_parallel_size=stages)
    pg = ProcessGroupCollection.use_mpu_process_groups()
    if own_groups:
        pg = _clone_layer_groups(pg)
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
    # The modules inside keep the stage they were built for; whoever reads the whole model's groups
    # (Megatron-LM's training_log reduces the MoE metrics over `model.pg_collection.pp`) gets the real pipeline.
    model.pg_collection = copy.copy(pg)
    model.pg_collection.pp = parallel_state.get_pipeline_model_parallel_group()
    enable_wgrad_deferral(model)
    return model


def keep_float16_between_stages(chunks: list) -> None:
    """megatron-core's Float16Module upcasts a chunk's output to FP32 when its rank is the pipeline's last
    (and reads that rank from the real pipeline group, which Megatron-LM's loop also reads off the wrapper);
    a dual chunk's stage is not its rank's, so each wrapper upcasts only at the model's last stage, and
    activations cross stages in 16 bits."""
    from megatron.core.transformer.module import Float16Module

    for chunk in chunks:
        stage = getattr(unwrap_model(chunk), "dsv3_stage", None)
        module = chunk
        while stage is not None and hasattr(module, "module"):
            if isinstance(module, Float16Module) and "forward" not in vars(module):
                module.forward = partial(Float16Module.forward, module, fp32_output=stage[0] == stage[1] - 1)
            module = module.module


def build_chunks(cfg: DSV3Config, schedule: str, *, seed: int, backend=None, **mcore_overrides) -> list:
    """This rank's two chunks. DualPipe's mirror copies are marked `shared`, so the gradient norm counts
    every stage once (megatron-core's `param_is_not_shared`), and checkpoint as replicas, stored once."""
    rank = parallel_state.get_pipeline_model_parallel_rank()
    ranks = parallel_state.get_pipeline_model_parallel_world_size()
    chunks = [build_stage(cfg, s, n, seed=seed, backend=backend, own_groups=c == 1, **mcore_overrides)
              for c, (s, n) in enumerate(chunk_stages(schedule, rank, ranks))]
    if schedule == "dualpipe":
        mirror = chunks[1]
        mirror.sharded_state_dict = MethodType(_replica_sharded_state_dict, mirror)
        for p in mirror.parameters():
            p.shared = True
    return chunks


def _replica_sharded_state_dict(model, *args, **kwargs):
    """A DualPipe mirror copy in checkpoints: the partner's chunk 0 writes the stage; the copy loads it only."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    sharded = type(model).sharded_state_dict(model, *args, **kwargs)
    for entry in nested_values(sharded):
        if hasattr(entry, "replica_id"):
            rid = entry.replica_id
            entry.replica_id = (1, *rid[1:]) if isinstance(rid, tuple) else rid + 1
    return sharded


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
    ranks = parallel_state.get_pipeline_model_parallel_world_size()
    return ranks - 1 - parallel_state.get_pipeline_model_parallel_rank()


def mirror_state(chunk) -> list[torch.Tensor]:
    """What DualPipe sums between mirror copies: every gradient and every router's token counts."""
    from megatron_dsv3.moe.balancing import biased_routers

    grads = [_grad(p) for p in unwrap_model(chunk).parameters()]
    return [g for g in grads if g is not None] + [r.local_tokens_per_expert for r in biased_routers([chunk])]
