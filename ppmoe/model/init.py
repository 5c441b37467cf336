"""Initialisation that does not depend on the layout: each rank fills only its own shards, and every
element gets the value it has in a one-process model of the same seed.

A weight's value at a global index is drawn from a generator seeded by (seed, the weight's name, the block
of rows it lies in): the rows are the weight's leading dimensions flattened ([out, in] -> out rows of
`in` values; stacked experts [E, d, h] -> E*d rows of h values), cut into blocks of ROWS_PER_SEED rows.
A rank regenerates the blocks its shard touches and keeps its part, so its memory at start-up is its
shard plus one block, and no rank ever holds a whole weight (a 143B model's stacked experts are tens of
GB). The distribution is GPT-2's: N(0, init_std), residual output projections (attention wo, FFN and
expert w2) N(0, init_std / sqrt(2 L)), norm gains 1.

The draws depend on ROWS_PER_SEED and on the names: changing either changes every initialisation.
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

ROWS_PER_SEED = 64
RESIDUAL_OUTPUTS = ("wo.weight", "w2.weight", "experts.w2")


def init_std(name: str, base_std: float, n_layers: int) -> float:
    """The normal's standard deviation of weight `name` (GPT-2: residual outputs scaled by 1/sqrt(2L))."""
    return base_std / math.sqrt(2 * n_layers) if name.endswith(RESIDUAL_OUTPUTS) else base_std


def block_generator(seed: int, name: str, block: int) -> torch.Generator:
    key = zlib.crc32(f"{seed}/{name}/{block}".encode())
    return torch.Generator(device="cpu").manual_seed(key)


def local_box(param: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(global shape, this rank's local shape, its offset in the global tensor) of a (DTensor) weight."""
    if isinstance(param, DTensor):
        shape = tuple(param.shape)
        local, offset = compute_local_shape_and_global_offset(shape, param.device_mesh, param.placements)
        return shape, tuple(local), tuple(offset)
    return tuple(param.shape), tuple(param.shape), (0,) * param.dim()


def normal_shard(seed: int, name: str, std: float, shape: tuple[int, ...], local: tuple[int, ...],
                 offset: tuple[int, ...]) -> torch.Tensor:
    """The [local] block at `offset` of the [shape] weight `name` drawn as described above (CPU, fp32)."""
    if 0 in local:
        return torch.empty(local)
    row_len = shape[-1]
    lead_shape, lead_local, lead_offset = shape[:-1], local[:-1], offset[:-1]
    # Global flat row index of every local row, in the local tensor's order.
    index = torch.zeros(lead_local, dtype=torch.long)
    stride = 1
    for dim in reversed(range(len(lead_shape))):
        positions = torch.arange(lead_offset[dim], lead_offset[dim] + lead_local[dim]) * stride
        index = index + positions.view([-1] + [1] * (len(lead_shape) - 1 - dim))
        stride *= lead_shape[dim]
    rows = index.reshape(-1)
    out = torch.empty(rows.numel(), local[-1])
    columns = slice(offset[-1], offset[-1] + local[-1])
    # A box's rows in row-major order have increasing global indices, so each block is one run of them.
    blocks, counts = torch.unique_consecutive(rows // ROWS_PER_SEED, return_counts=True)
    start = 0
    for block, count in zip(blocks.tolist(), counts.tolist()):
        values = torch.empty(ROWS_PER_SEED, row_len).normal_(0.0, std, generator=block_generator(seed, name, block))
        run = rows[start:start + count]
        out[start:start + count] = values[run - block * ROWS_PER_SEED, columns]
        start += count
    return out.view(local)


@torch.no_grad()
def initialise(model: nn.Module, seed: int, base_std: float, n_layers: int) -> None:
    """Fill every parameter of `model` (the whole GPT, or a pipeline stage of it, possibly sharded) in
    place: names are the whole model's, so a stage's weights equal the whole model's. A tied weight is
    filled once, under its first name."""
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        local = param.to_local() if isinstance(param, DTensor) else param
        if param.dim() == 1:
            local.fill_(1.0)
            continue
        shape, local_shape, offset = local_box(param)
        values = normal_shard(seed, name, init_std(name, base_std, n_layers), shape, local_shape, offset)
        local.copy_(values.to(local.dtype))
