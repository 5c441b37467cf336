"""Pipeline parallelism with torch.distributed.pipelining: split the GPT into stages, build the schedule.

The model is split by layers. Stage s of S owns a contiguous range of layers; the first stage also owns
the embedding, the last the final norm and output head. With `virtual` stages per rank (interleaved
schedules) rank r runs stages r, r + pp, r + 2 pp, ... (the looped placement those schedules expect).
A stage is a GPT whose other layers were deleted, so parameter names (and checkpoint keys) stay those of
the whole model: a checkpoint saved at one pipeline layout loads at any other.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

from ..model.gpt import GPT

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B}
MULTI_STAGE = {"interleaved_1f1b"}


def layers_per_stage(n_layers: int, num_stages: int, explicit: list[int] | None) -> list[int]:
    """Layer counts per stage: the explicit list (parallel.pp_layers, checked with the config), or as even
    as possible, earlier stages taking the remainder (the last stage also computes the output head)."""
    if explicit:
        return list(explicit)
    base, extra = divmod(n_layers, num_stages)
    return [base + (1 if s < extra else 0) for s in range(num_stages)]


def stage_ids(pp_rank: int, pp_size: int, virtual: int) -> list[int]:
    """Stages run by this pipeline rank (looped placement)."""
    return [pp_rank + v * pp_size for v in range(virtual)]


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
    parameter names are those of the whole model, for the optimizer and checkpoints."""

    def __init__(self, parts: list[GPT]):
        super().__init__()
        self.tok_embeddings = next((p.tok_embeddings for p in parts if p.tok_embeddings is not None), None)
        self.layers = nn.ModuleDict({name: layer for p in parts for name, layer in p.layers.items()})
        self.norm = next((p.norm for p in parts if p.norm is not None), None)
        self.output = next((p.output for p in parts if p.output is not None), None)


def split_for_pipeline(model: GPT, pp_mesh: DeviceMesh, virtual: int, explicit: list[int] | None
                       ) -> tuple[list[int], list[GPT]]:
    """(stage indices, stage modules) of this rank."""
    pp = pp_mesh.size()
    counts = layers_per_stage(model.shape.n_layers, pp * virtual, explicit)
    ids = stage_ids(pp_mesh.get_local_rank(), pp, virtual)
    return ids, [make_stage_module(model, s, counts) for s in ids]


def build_schedule(name: str, parts: list[GPT], ids: list[int], num_stages: int, pp_mesh: DeviceMesh,
                   device: torch.device, n_microbatches: int, loss_fn: Callable):
    """The torch.distributed.pipelining schedule running this rank's stages. `loss_fn(output, target)`
    is called on the last stage per micro-batch; gradients are not rescaled by the schedule (the loss
    function divides by the micro-batch count, as the non-pipelined path does)."""
    stages = [PipelineStage(part, stage_index=s, num_stages=num_stages, device=device, group=pp_mesh.get_group())
              for part, s in zip(parts, ids)]
    schedule_cls = SCHEDULES[name]
    if name in MULTI_STAGE:
        return schedule_cls(stages, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
    return schedule_cls(stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
