"""Expert layouts (`moe.dispatcher`): where experts live and how tokens reach them. See base.py.

local: every expert on every rank, no communication (the reference); experts_in_tp: Pipeline-MoE,
experts split over the TP group, one all-reduce; alltoall: classic expert parallelism over the
data-parallel ranks, two all-to-alls. Under sequence parallelism experts_in_tp takes its
sequence-parallel form (experts_in_tp_sp.py: all-gather in, reduce-scatter out), which the
sequence-parallel plan (ppmoe.parallel.sequence_parallel) puts in its place.
"""

from __future__ import annotations

from typing import Callable

from torch.distributed.device_mesh import DeviceMesh

from .alltoall import AllToAllExperts
from .base import ExpertLayout, shard_experts
from .experts_in_tp import ExpertsInTP
from .experts_in_tp_sp import SequenceParallelExpertsInTP
from .local import LOCAL_EXPERTS, LocalExperts

# moe.dispatcher -> (the mesh dimension the experts are split over, the layout over a group of 2+ ranks).
# Over a group of one rank every layout is the local one.
SPLIT_LAYOUTS: dict[str, tuple[str, Callable[[DeviceMesh, int], ExpertLayout]]] = {
    "experts_in_tp": ("tp", ExpertsInTP),
    "alltoall": ("dp", AllToAllExperts),
}


def build_expert_layout(name: str, mesh: DeviceMesh | None, num_experts: int) -> ExpertLayout:
    """The layout `name` (moe.dispatcher) on this rank of the ('pp', 'dp', 'tp') `mesh` (None: one process)
    for layers of `num_experts` experts (0: a dense model, which has no MoE layer)."""
    if name == "local" or mesh is None or num_experts == 0:
        return LOCAL_EXPERTS
    dim, layout = SPLIT_LAYOUTS[name]
    group = mesh[dim]
    return LOCAL_EXPERTS if group.size() == 1 else layout(group, num_experts)


__all__ = ["AllToAllExperts", "ExpertLayout", "ExpertsInTP", "LOCAL_EXPERTS", "LocalExperts",
           "SequenceParallelExpertsInTP", "build_expert_layout", "shard_experts"]
