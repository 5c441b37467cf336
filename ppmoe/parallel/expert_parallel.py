"""How MoE layers are laid out over the tensor-parallel group, chosen by `moe.dispatcher` at build time.

- pipeline: Pipeline-MoE. Expert weights become DTensors sharded along the expert dimension (each TP
  rank stores E/T whole experts, and checkpoints store each expert once), and the layer's dispatcher
  becomes PipelineDispatcher over the TP group.
- local: every TP rank keeps all experts and computes all of them (no communication; the reference).
The router gate stays replicated: every rank must make the same routing decision.
"""

from __future__ import annotations

from typing import Callable

import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor

from ..moe.dispatch import PipelineDispatcher
from ..moe.layer import MoEFeedForward


def shard_experts(moe: MoEFeedForward, mesh: DeviceMesh) -> None:
    """Replace w1/w3/w2 [E, ...] by DTensors sharded on dim 0 over `mesh` (every rank must hold the same
    full weights before the call)."""
    for name in ("w1", "w3", "w2"):
        full = getattr(moe.experts, name)
        setattr(moe.experts, name, nn.Parameter(distribute_tensor(full.data, mesh, [Shard(0)])))


def apply_pipeline_moe(moe: MoEFeedForward, tp_mesh: DeviceMesh) -> None:
    shard_experts(moe, tp_mesh)
    moe.dispatch = PipelineDispatcher(tp_mesh.get_group(), moe.experts.num_experts)


def apply_local_moe(moe: MoEFeedForward, tp_mesh: DeviceMesh) -> None:
    """Nothing to do: the LocalDispatcher built with the model already runs every expert here."""


MOE_STYLES: dict[str, Callable[[MoEFeedForward, DeviceMesh], None]] = {
    "pipeline": apply_pipeline_moe, "local": apply_local_moe,
}
