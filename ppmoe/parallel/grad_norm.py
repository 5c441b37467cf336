"""Global gradient norm and clipping for a model whose parameters mix plain tensors and DTensors
sharded over different mesh dimensions (TP-sharded weights, FSDP-sharded weights, replicated norms).

A parameter that is a copy of one another pipeline rank holds (the output head of a tied embedding on the
last stage, ppmoe.parallel.tied_embeddings) carries a gradient equal to the original's: it is marked with
`count_elsewhere` and left out here, so the norm counts the tied weight once, as the single-process model
does (Megatron marks it `shared` for the same reason).
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def sharded_groups(grad: torch.Tensor) -> tuple:
    """The process groups over which this gradient is split: its squared sum must be added over them.
    Replicated dimensions contribute nothing (each rank already holds the full values)."""
    if not isinstance(grad, DTensor):
        return ()
    groups = []
    for dim, placement in enumerate(grad.placements):
        if placement.is_partial():
            raise RuntimeError("a gradient is still a partial sum; reduce it before computing its norm")
        if placement.is_shard() or type(placement).__name__ == "_StridedShard":
            groups.append(grad.device_mesh.get_group(dim))
    return tuple(groups)


COUNTED_ELSEWHERE = "_grad_norm_counted_elsewhere"


def count_elsewhere(param: torch.nn.Parameter) -> None:
    """Mark `param` as an exact copy of a parameter another rank holds and counts in the gradient norm."""
    setattr(param, COUNTED_ELSEWHERE, True)


def counted_here(param: torch.nn.Parameter) -> bool:
    return not getattr(param, COUNTED_ELSEWHERE, False)


@torch.no_grad()
def global_grad_norm(parameters: Iterable[torch.nn.Parameter], stage_group: dist.ProcessGroup | None = None
                     ) -> torch.Tensor:
    """L2 norm of all gradients as if they were one full, unsharded vector (a 0-d float32 tensor).
    `stage_group`: the pipeline group, whose ranks hold disjoint parameters (their squares add up)."""
    by_groups: dict[tuple, torch.Tensor] = {}
    seen = set()
    for p in parameters:
        if p.grad is None or id(p) in seen or not counted_here(p):  # tied weights count once
            continue
        seen.add(id(p))
        grad = p.grad
        local = grad.to_local() if isinstance(grad, DTensor) else grad
        key = sharded_groups(grad)
        square = local.float().pow(2).sum()
        by_groups[key] = by_groups[key] + square if key in by_groups else square
    total = torch.zeros((), dtype=torch.float32)
    for groups, square in by_groups.items():
        for group in groups:
            dist.all_reduce(square, group=group)
        total = total.to(square.device) + square
    if stage_group is not None and dist.get_world_size(stage_group) > 1:
        dist.all_reduce(total, group=stage_group)
    return total.sqrt()


@torch.no_grad()
def clip_grad_norm(parameters: Iterable[torch.nn.Parameter], max_norm: float,
                   stage_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Scale gradients so that their global norm is at most `max_norm` (0 = measure only).
    Returns the norm before clipping."""
    parameters = list(parameters)
    norm = global_grad_norm(parameters, stage_group)
    if max_norm > 0:
        scale = min(1.0, max_norm / (float(norm) + 1e-6))
        if scale < 1.0:
            for p in {id(p): p for p in parameters if p.grad is not None}.values():
                p.grad.mul_(scale)
    return norm
