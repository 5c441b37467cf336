"""Pipeline parallelism with torch.distributed.pipelining: split the GPT into stages, build the schedule.

The model is split by layers. Stage s of S owns a contiguous range of layers; the first stage also owns
the embedding, the last the final norm and output head. A schedule runs `virtual` stages per rank, placed
as the schedule expects (PLACEMENTS): looped (rank r runs stages r, r + pp, r + 2 pp, ...: 1F1B, GPipe,
the interleaved schedules) or in a V (rank r runs stages r and 2 pp - 1 - r: ZBV and DualPipeV, so rank 0
holds both the first and the last stage).
A stage is a GPT whose other layers were deleted, so parameter names (and checkpoint keys) stay those of
the whole model: a checkpoint saved at one pipeline layout loads at any other.

The zero-bubble schedules (interleaved_zb, zbv, dualpipev) split each backward into B (gradients of the
stage input, sent on at once) and W (gradients of the weights, run later to fill the bubbles); torch does
the split on the autograd graph, so a stage module needs nothing special for it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
from torch.distributed._composable.replicate_with_fsdp import ReplicateModule
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleDualPipeV, ScheduleGPipe,
                                          ScheduleInterleaved1F1B, ScheduleInterleavedZeroBubble,
                                          ScheduleZBVZeroBubble)

from ..config import ParallelConfig
from ..model.gpt import GPT


def looped_stage_ids(pp_rank: int, pp_size: int, virtual: int) -> list[int]:
    """Rank r runs stages r, r + pp, r + 2 pp, ... (one stage per rank when virtual is 1)."""
    return [pp_rank + v * pp_size for v in range(virtual)]


def v_stage_ids(pp_rank: int, pp_size: int, virtual: int) -> list[int]:
    """Rank r runs stages r and 2 pp - 1 - r: down the ranks and back up (virtual is 2, ParallelConfig's
    rule), so a micro-batch turns around on the last rank without a send."""
    return [pp_rank, 2 * pp_size - 1 - pp_rank]


@dataclass(frozen=True)
class ScheduleKind:
    """A torch schedule class, where it wants its stages, whether it takes a list of them, and whether
    it splits each backward into B and W (zero bubble)."""

    cls: type
    placement: Callable[[int, int, int], list[int]]
    multi_stage: bool
    splits_backward: bool = False


SCHEDULES = {
    "gpipe": ScheduleKind(ScheduleGPipe, looped_stage_ids, multi_stage=False),
    "1f1b": ScheduleKind(Schedule1F1B, looped_stage_ids, multi_stage=False),
    "interleaved_1f1b": ScheduleKind(ScheduleInterleaved1F1B, looped_stage_ids, multi_stage=True),
    "interleaved_zb": ScheduleKind(ScheduleInterleavedZeroBubble, looped_stage_ids, multi_stage=True,
                                   splits_backward=True),
    "zbv": ScheduleKind(ScheduleZBVZeroBubble, v_stage_ids, multi_stage=True, splits_backward=True),
    "dualpipev": ScheduleKind(ScheduleDualPipeV, v_stage_ids, multi_stage=True, splits_backward=True),
}


def layers_per_stage(n_layers: int, num_stages: int, explicit: list[int] | None) -> list[int]:
    """Layer counts per stage: the explicit list (parallel.pp_layers, checked with the config), or as even
    as possible, earlier stages taking the remainder (the last stage also computes the output head)."""
    if explicit:
        return list(explicit)
    base, extra = divmod(n_layers, num_stages)
    return [base + (1 if s < extra else 0) for s in range(num_stages)]


def stage_ids(pp_rank: int, par: ParallelConfig) -> list[int]:
    """Stages run by pipeline rank `pp_rank`, in increasing order, as parallel.pp_schedule places them."""
    return sorted(SCHEDULES[par.pp_schedule].placement(pp_rank, par.pp, par.pp_virtual_stages))


def rank_of_stage(stage: int, par: ParallelConfig) -> int:
    """The pipeline rank that runs `stage`."""
    return next(r for r in range(par.pp) if stage in stage_ids(r, par))


def make_stage_module(model: GPT, stage: int, counts: list[int]) -> GPT:
    """A copy of `model` keeping only stage `stage`'s layers (and the embedding / head at the ends)."""
    first = sum(counts[:stage])
    keep = {str(i) for i in range(first, first + counts[stage])}
    part = copy.deepcopy(model)
    for name in list(part.layers.keys()):
        if name not in keep:
            del part.layers[name]
    if stage != 0:
        part.tok_embeddings = None
    if stage != len(counts) - 1:
        part.norm = None
        part.output = None
    return part


class StageUnion(nn.Module):
    """The stage modules of one rank seen as one partial GPT (shared submodules, no forward): its
    parameter names are those of the whole model, for the optimizer and checkpoints.

    With a tied embedding, a rank holding an end of the tie presents its copy under both names,
    tok_embeddings and output (one module under two names), as the single-process tied model presents
    its one matrix: checkpoints hold the same keys, and the optimizer state under tok_embeddings.weight,
    whatever the layout. Where both ends are here, the head's own copy stays out of the view: it follows
    the embedding (ppmoe.parallel.tied_embeddings)."""

    def __init__(self, parts: list[GPT]):
        super().__init__()
        embedding = next((p.tok_embeddings for p in parts if p.tok_embeddings is not None), None)
        head = next((p.output for p in parts if p.output is not None), None)
        if parts[0].shape.tie_embeddings:
            embedding = embedding if embedding is not None else head
            head = embedding
        self.tok_embeddings = embedding
        self.layers = nn.ModuleDict({name: layer for p in parts for name, layer in p.layers.items()})
        self.norm = next((p.norm for p in parts if p.norm is not None), None)
        self.output = head


def stage_view(parts: list[GPT]) -> nn.Module:
    """This rank's parameters under the whole model's names: its one stage module itself, or their
    StageUnion (several stages, or a stage holding one end of a tied embedding)."""
    part = parts[0]
    whole_tie = part.tok_embeddings is not None and part.output is not None
    if len(parts) == 1 and (not part.shape.tie_embeddings or whole_tie):
        return part
    return StageUnion(parts)


def split_for_pipeline(model: GPT, pp_mesh: DeviceMesh, par: ParallelConfig) -> tuple[list[int], list[GPT]]:
    """(stage indices, stage modules) of this rank."""
    counts = layers_per_stage(model.shape.n_layers, par.pp * par.pp_virtual_stages, par.pp_layers)
    ids = stage_ids(pp_mesh.get_local_rank(), par)
    return ids, [make_stage_module(model, s, counts) for s in ids]


def keep_gathered_until_backward_ends(part: nn.Module) -> None:
    """Under FSDP, keep `part`'s blocks gathered from their forward until the step's gradient reduction
    (torch's REDUCE_GRAD action reshards them then). A split backward differentiates against the weights
    the stage module holds when B runs; a block resharded after its forward holds its sharded parameters
    then, not the gathered ones its graph used, and its W would compute no gradient. The cost is ZeRO-2's
    memory (a stage's whole weights held through the step), which pipelined FSDP pays anyway: resharding
    after each forward would gather every block once per micro-batch. DDP (replicate) never shards."""
    if isinstance(part, FSDPModule) and not isinstance(part, ReplicateModule):
        part.set_reshard_after_forward(False, recurse=True)


def build_schedule(name: str, parts: list[GPT], ids: list[int], num_stages: int, pp_mesh: DeviceMesh,
                   device: torch.device, n_microbatches: int, loss_fn: Callable):
    """The torch.distributed.pipelining schedule running this rank's stages. `loss_fn(output, target)`
    is called on the last stage per micro-batch; gradients are not rescaled by the schedule (the loss
    function divides by the micro-batch count, as the non-pipelined path does)."""
    kind = SCHEDULES[name]
    if kind.splits_backward:
        for part in parts:
            keep_gathered_until_backward_ends(part)
    stages = [PipelineStage(part, stage_index=s, num_stages=num_stages, device=device, group=pp_mesh.get_group())
              for part, s in zip(parts, ids)]
    return kind.cls(stages if kind.multi_stage else stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn,
                    scale_grads=False)
