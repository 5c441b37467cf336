"""Data parallelism over the mesh's 'dp' dimension, composed with tensor parallelism.

Both flavours come from FSDP2's machinery, which understands DTensor (TP-sharded) parameters:
- 'fsdp': `fully_shard` per block and at the root; parameters, gradients and optimizer state are
  sharded over dp and gathered per block for compute.
- 'ddp': `replicate` (the FSDP2-based DDP); parameters replicated, gradients all-reduced.
torch's classic DistributedDataParallel is not used: it cannot hold DTensor parameters (TP x DP fails
in its start-up broadcast).
Both take the run's MixedPrecisionPolicy (mixed_precision.py): under bf16 compute the wrapper is what
casts, so it is applied even over a single data-parallel rank.
"""

from __future__ import annotations

from typing import Callable

import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed._composable.replicate_with_fsdp import replicate
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from ..model.gpt import GPT
from .mixed_precision import FULL_PRECISION, Precision


def apply_fsdp(model: GPT, dp_mesh: DeviceMesh, ignored: set[nn.Parameter], policy: MixedPrecisionPolicy) -> None:
    for layer in model.layers.values():
        fully_shard(layer, mesh=dp_mesh, ignored_params=ignored or None, mp_policy=policy)
    fully_shard(model, mesh=dp_mesh, ignored_params=ignored or None, mp_policy=policy)


def apply_ddp(model: GPT, dp_mesh: DeviceMesh, ignored: set[nn.Parameter], policy: MixedPrecisionPolicy) -> None:
    replicate(model, mesh=dp_mesh, ignored_params=ignored or None, mp_policy=policy)


DATA_PARALLEL: dict[str, Callable[[GPT, DeviceMesh, set[nn.Parameter], MixedPrecisionPolicy], None]] = {
    "fsdp": apply_fsdp, "ddp": apply_ddp}


def apply_data_parallel(model: GPT, dp_mesh: DeviceMesh, dp_type: str, ignored: set[nn.Parameter] = frozenset(),
                        precision: Precision = FULL_PRECISION) -> None:
    """Wrap `model` in place; `ignored` parameters (experts owned by one DP rank) are neither sharded nor
    reduced (nor cast). With one data-parallel rank nothing is wrapped under fp32; under bf16 the wrapper
    runs over the one rank, since its policy is what casts (mixed_precision.py)."""
    if dp_mesh.size() > 1 or precision.mixed:
        DATA_PARALLEL[dp_type](model, dp_mesh, set(ignored), precision.policy())


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Skip the gradient reduction on all but the last micro-batch of an accumulation window."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)
