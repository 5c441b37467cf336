"""Where the experts of MoE layers live, chosen by `moe.dispatcher` when the model is parallelised.

- pipeline: Pipeline-MoE. Expert weights become DTensors sharded along the expert dimension over the
  TP group (each TP rank stores E/T whole experts; checkpoints store each expert once) and the layer's
  dispatcher becomes PipelineDispatcher over the TP group.
- alltoall: classic expert parallelism (the DPMoE baseline). Experts are sharded the same way but over
  the data-parallel group, and tokens travel by all-to-all. Expert weights are then owned by one DP
  rank each, so they are kept out of the DP gradient reduction; their gradient, which the all-to-all
  backward already sums over all DP ranks' losses, is divided by dp to match the averaged loss.
- local: every rank keeps all experts and computes all of them (no communication; the reference).
The router gate stays replicated: every rank of a TP group must make the same routing decision.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor

from ..moe.dispatch import AllToAllDispatcher, PipelineDispatcher
from ..moe.layer import MoEFeedForward


def shard_experts(moe: MoEFeedForward, mesh: DeviceMesh) -> list[nn.Parameter]:
    """Replace w1/w3/w2 [E, ...] by DTensors sharded on dim 0 over `mesh` (a 1D mesh; every rank must
    hold the same full weights before the call). Returns the new parameters."""
    params = []
    for name in ("w1", "w3", "w2"):
        full = getattr(moe.experts, name)
        param = nn.Parameter(distribute_tensor(full.data, mesh, [Shard(0)]))
        setattr(moe.experts, name, param)
        params.append(param)
    return params


def apply_pipeline_moe(moe: MoEFeedForward, mesh: DeviceMesh) -> list[nn.Parameter]:
    tp_mesh = mesh["tp"]
    if tp_mesh.size() == 1:
        return []  # one rank holds every expert: the local dispatcher is Pipeline-MoE at TP=1
    shard_experts(moe, tp_mesh)
    moe.dispatch = PipelineDispatcher(tp_mesh.get_group(), moe.experts.num_experts)
    return []


def apply_alltoall_moe(moe: MoEFeedForward, mesh: DeviceMesh) -> list[nn.Parameter]:
    dp_mesh = mesh["dp"]
    ep = dp_mesh.size()
    if ep == 1:
        return []
    params = shard_experts(moe, dp_mesh)
    for p in params:
        p.register_hook(lambda grad: grad / ep)
    moe.dispatch = AllToAllDispatcher(dp_mesh.get_group(), moe.experts.num_experts)
    return params


def apply_local_moe(moe: MoEFeedForward, mesh: DeviceMesh) -> list[nn.Parameter]:
    """Nothing to do: the LocalDispatcher built with the model already runs every expert here."""
    return []


MOE_STYLES: dict[str, Callable[[MoEFeedForward, DeviceMesh], list[nn.Parameter]]] = {
    "experts_in_tp": apply_pipeline_moe, "alltoall": apply_alltoall_moe, "local": apply_local_moe,
}


def apply_expert_layout(model: nn.Module, mesh: DeviceMesh, dispatcher: str) -> set[nn.Parameter]:
    """Lay out every MoE layer of `model` over the ('pp', 'dp', 'tp') `mesh`. Returns the parameters
    that data parallelism must leave alone (each DP rank owns different ones)."""
    owned: set[torch.nn.Parameter] = set()
    for module in model.modules():
        if isinstance(module, MoEFeedForward):
            owned.update(MOE_STYLES[dispatcher](module, mesh))
    return owned
