"""Plain model (on the meta device) -> this rank's parallel model: pipeline split, tensor (and sequence)
parallel, expert layout, activation checkpointing, compile, data parallel (with its mixed-precision casts),
in that order (torchtitan's order), then this rank's shards materialised; and the runner that drives it."""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh

from ..model.build import materialize
from ..model.gpt import GPT
from ..config import BatchLayout, ParallelConfig, ParallelDims, TrainConfig
from ..parallel import apply_data_parallel, apply_expert_layout
from ..parallel.activation_checkpointing import apply_activation_checkpointing
from ..parallel.compile_blocks import apply_compile
from ..parallel.expert_parallel import prepare_expert_gradients
from ..parallel.mixed_precision import Precision
from ..parallel.pipeline import build_schedule, split_for_pipeline, stage_view
from ..parallel.sequence_parallel import sum_partial_gradients, tensor_parallel_step
from ..parallel.tied_embeddings import tie_pipeline_ends
from ..model.loss import LossFunction
from .runner import PipelineRunner, SingleStageRunner


def parallelize(model: GPT, par: ParallelConfig, dims: ParallelDims, batch: BatchLayout, mesh: DeviceMesh,
                device: torch.device, loss_fn: LossFunction, precision: Precision, seed: int,
                train: TrainConfig = TrainConfig()):
    """`model` on the meta device -> (view, runner): `view` holds this rank's parameters under the whole
    model's names (for the optimizer and checkpoints), materialised on `device` and initialised from
    `seed` (the same values as a one-process model); `runner` runs a batch's forward and backward.
    `precision`: the casts the data-parallel wrapper applies (ppmoe.parallel.mixed_precision; no autocast
    anywhere). `train`: activation checkpointing and torch.compile of the blocks."""
    if dims.pp == 1:
        parts, ids = [model], [0]
    else:
        ids, parts = split_for_pipeline(model, mesh["pp"], par)
    for part in parts:
        tensor_parallel_step(par.sequence_parallel)(part, mesh["tp"])
        owned = apply_expert_layout(part)
        apply_activation_checkpointing(part, train.activation_checkpointing, train.ac_every)
        apply_compile(part, train.compile)
        apply_data_parallel(part, mesh["dp"], par.dp_type, owned, precision)
        materialize(part, seed, device)  # this rank's shards only, now that every placement is known
        prepare_expert_gradients(part)
        sum_partial_gradients(part)  # sequence-parallel norms' weights (a no-op without SP)
    if dims.pp == 1:
        return model, SingleStageRunner(model, batch, loss_fn)
    num_stages = dims.pp * par.pp_virtual_stages

    def make_schedule(microbatch_loss):
        return build_schedule(par.pp_schedule, parts, ids, num_stages, mesh["pp"], device, batch.micro_batches,
                              microbatch_loss)

    return stage_view(parts), PipelineRunner(parts, num_stages - 1 in ids, batch, loss_fn, make_schedule,
                                             tie_pipeline_ends(parts, mesh, par))
