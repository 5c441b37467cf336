"""Plain model -> this rank's parallel model: pipeline split, tensor parallel, expert layout, data
parallel, in that order (torchtitan's order), and the runner that drives it."""

from __future__ import annotations

from typing import Callable, ContextManager

import torch
from torch.distributed.device_mesh import DeviceMesh

from ..model.build import materialize
from ..model.gpt import GPT
from ..config import BatchLayout, ParallelConfig, ParallelDims
from ..parallel import apply_data_parallel, apply_expert_layout, apply_tensor_parallel
from ..parallel.expert_parallel import prepare_expert_gradients
from ..parallel.pipeline import build_schedule, split_for_pipeline, stage_view
from ..parallel.tied_embeddings import tie_pipeline_ends
from ..model.loss import LossFunction
from .runner import PipelineRunner, SingleStageRunner


def parallelize(model: GPT, par: ParallelConfig, dims: ParallelDims, batch: BatchLayout, mesh: DeviceMesh,
                device: torch.device, loss_fn: LossFunction, autocast: Callable[[], ContextManager], seed: int):
    """`model` on the meta device -> (view, runner): `view` holds this rank's parameters under the whole
    model's names (for the optimizer and checkpoints), materialised on `device` and initialised from
    `seed` (the same values as a one-process model); `runner` runs a batch's forward and backward."""
    if dims.pp == 1:
        parts, ids = [model], [0]
    else:
        ids, parts = split_for_pipeline(model, mesh["pp"], par)
    for part in parts:
        apply_tensor_parallel(part, mesh["tp"])
        owned = apply_expert_layout(part)
        apply_data_parallel(part, mesh["dp"], par.dp_type, owned)
        materialize(part, seed, device)  # this rank's shards only, now that every placement is known
        prepare_expert_gradients(part)
    if dims.pp == 1:
        return model, SingleStageRunner(model, batch, loss_fn, autocast)
    num_stages = dims.pp * par.pp_virtual_stages

    def make_schedule(microbatch_loss):
        return build_schedule(par.pp_schedule, parts, ids, num_stages, mesh["pp"], device, batch.micro_batches,
                              microbatch_loss)

    return stage_view(parts), PipelineRunner(parts, num_stages - 1 in ids, batch, loss_fn, autocast, make_schedule,
                                             tie_pipeline_ends(parts, mesh, par))
