"""Everything one stage trains with, built in one function: mesh, model, parallelism, runner, optimizer,
the patch input and loss, the data loader and the MoE monitor.

A stage boundary throws the runtime away and builds the next stage's from the boundary checkpoint (the
layout may change: tp, pp and dp are per stage, the world is fixed), so the training loop never branches
on what a stage is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh

from patchtrain import StageIO, stage_io

from ..config import ParallelDims, resolve_layout
from ..data import BatchLoader, ChunkedLoader
from ..model.build import meta_model
from ..model.loss import build_loss
from ..moe import build_expert_layout
from ..parallel import Runtime, build_mesh
from ..parallel.mixed_precision import resolve_precision
from .moe_metrics import MoEMonitor
from .optim import build_optimizer
from .parallelize import parallelize
from .plan import Stage, StagePlan


class MeshCache:
    """One device mesh per (tp, pp, dp) split: stages with the same layout share its process groups."""

    def __init__(self, world_size: int, device_type: str):
        self.world_size, self.device_type = world_size, device_type
        self.meshes: dict[ParallelDims, DeviceMesh] = {}

    def get(self, dims: ParallelDims) -> DeviceMesh:
        if dims not in self.meshes:
            self.meshes[dims] = build_mesh(dims, self.device_type)
        return self.meshes[dims]


@dataclass
class StageRuntime:
    """`model`: this rank's parameters (all layers, or its pipeline stages) under the whole model's names,
    for the optimizer and checkpoints; `runner` runs a batch's forward and backward."""

    stage: Stage
    dims: ParallelDims
    mesh: DeviceMesh
    model: nn.Module
    runner: object
    optimizer: torch.optim.Optimizer
    io: StageIO
    loader: BatchLoader | ChunkedLoader
    moe: MoEMonitor
    device: torch.device

    @property
    def pp_group(self) -> dist.ProcessGroup | None:
        return self.mesh["pp"].get_group() if self.dims.pp > 1 else None

    @property
    def dp_group(self) -> dist.ProcessGroup:
        return self.mesh["dp"].get_group()

    @property
    def dp_rank(self) -> int:
        return self.mesh["dp"].get_local_rank()

    def use_objective(self, patch_size: int, seq_len: int) -> None:
        """Read patches of `patch_size` tokens (1: tokens) over `seq_len` positions and score them so: the
        stage's own objective, or for the growth probe the previous stage's."""
        self.io.close()
        self.io = stage_io(patch_size, self.runner.parts, self.dims.tp, self.device, seq_len)
        self.runner.set_loss(self.io.loss_fn)

    def close(self) -> None:
        self.io.close()


def build_loader(plan: StagePlan, stage: Stage, dp_rank: int, dp_size: int) -> BatchLoader | ChunkedLoader:
    """The stage's training batches, in the run's one data order (ChunkedLoader when stages read windows
    of different lengths, else the ordinary samples, so a run without patches or growth of seq_len reads
    exactly what a plain run reads)."""
    t, data = stage.cfg.train, stage.cfg.data
    if plan.chunked_data:
        return ChunkedLoader(data.dataset_dir, "train", plan.chunk_len, stage.patch_size * (t.seq_len + 1),
                             t.global_batch_size, dp_rank, dp_size, t.seed)
    return BatchLoader(data.dataset_dir, "train", t.seq_len, t.global_batch_size, dp_rank, dp_size, t.seed)


def build_stage_runtime(plan: StagePlan, stage: Stage, rt: Runtime, meshes: MeshCache, log: Callable[[str], None]
                        ) -> StageRuntime:
    """Build `stage` on this rank, initialised from the seed (a boundary then loads its checkpoint)."""
    cfg, t = stage.cfg, stage.cfg.train
    dims, batch = resolve_layout(cfg, rt.world_size)
    mesh = meshes.get(dims)
    precision = resolve_precision(t.dtype, t.reduce_dtype, rt.device.type)
    shape = stage.shape
    experts = build_expert_layout(cfg.moe.dispatcher, mesh, shape.moe.num_experts if shape.moe else 0)
    # Built on the meta device: parallelize splits and shards it, then materialises this rank's shards only.
    structure = meta_model(shape, experts, batch.loss_scale)
    model, runner = parallelize(structure, cfg.parallel, dims, batch, mesh, rt.device, build_loss(dims.tp),
                                precision, t.seed, t)
    optimizer = build_optimizer(model, t, rt.device)
    io = stage_io(stage.patch_size, runner.parts, dims.tp, rt.device, t.seq_len)
    runner.set_loss(io.loss_fn)
    moe_ids = [i for i in range(shape.n_layers) if shape.is_moe_layer(i)]
    pp_group = mesh["pp"].get_group() if dims.pp > 1 else None
    moe = MoEMonitor(model.layers, moe_ids, shape.moe.num_experts if shape.moe else 0, pp_group,
                     mesh["dp"].get_group(), cfg.moe.imbalance_warn_ratio, cfg.moe.imbalance_warn_steps, log)
    loader = build_loader(plan, stage, mesh["dp"].get_local_rank(), dims.dp)
    return StageRuntime(stage, dims, mesh, model, runner, optimizer, io, loader, moe, rt.device)
