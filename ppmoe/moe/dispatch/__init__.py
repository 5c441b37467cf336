"""Token dispatchers: how routed tokens reach their experts and come back (`moe.dispatcher`).

Each is a callable `(x [T, d], routing, experts) -> [T, d]`, chosen when the model is parallelised:
local (all experts here, no communication), pipeline (Pipeline-MoE, experts over the TP group, one
all-reduce), alltoall (classic expert parallelism, two all-to-alls over the EP group).
"""

from .alltoall import AllToAllDispatcher
from .local import LocalDispatcher
from .pipeline import PipelineDispatcher

__all__ = ["LocalDispatcher", "PipelineDispatcher", "AllToAllDispatcher"]
