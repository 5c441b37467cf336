"""Autograd-aware collectives for the MoE dispatchers (Megatron's region semantics), on explicit groups.

copy_to_group:     forward identity,   backward all-reduce (sum)   -- enters a region where each rank
                                                                    computes a part of the result
copy_many_to_group: the same for several tensors, one all-reduce for all their gradients
reduce_from_group: forward all-reduce, backward identity           -- leaves that region
all_to_all:        forward all-to-all with split sizes, backward the reverse all-to-all

Sequence parallelism (tokens arrive and leave as each rank's slice of the sequence, along `dim`):
gather_from_sequence:       forward all-gather, backward reduce-scatter -- enters the region where each
                                                                         rank computes a part of the result
replicated_from_sequence:   the gathered tensor again, for work every rank repeats identically (the
                            router): backward hands each rank's slice its own part of the (identical)
                            gradient, no communication
reduce_scatter_to_sequence: forward reduce-scatter, backward all-gather  -- leaves the region
An all-gather plus a reduce-scatter move the bytes of one all-reduce (a ring all-reduce is exactly those two).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class _CopyToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _CopyManyToGroup(torch.autograd.Function):
    """copy_to_group for several tensors whose gradients are all-reduced together in ONE collective."""

    @staticmethod
    def forward(ctx, group, *tensors):
        ctx.group = group
        ctx.shapes = [t.shape for t in tensors]
        return tensors if len(tensors) > 1 else tensors[0]

    @staticmethod
    def backward(ctx, *grads):
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat, group=ctx.group)
        out, offset = [], 0
        for g, shape in zip(grads, ctx.shapes):
            n = g.numel()
            out.append(flat[offset:offset + n].view(shape).to(g.dtype))
            offset += n
        return (None, *out)


class _ReduceFromGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        # The partial sum is a fresh tensor only this op uses: reduce it in place, no copy.
        x = x.contiguous()
        dist.all_reduce(x, group=group)
        ctx.mark_dirty(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group):
        ctx.group, ctx.output_splits, ctx.input_splits = group, output_splits, input_splits
        out = x.new_empty((sum(output_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        back = grad.new_empty((sum(ctx.input_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), ctx.input_splits, ctx.output_splits, group=ctx.group)
        return back, None, None, None


def copy_to_group(x: torch.Tensor, group) -> torch.Tensor:
    return _CopyToGroup.apply(x, group)


def copy_many_to_group(tensors: tuple[torch.Tensor, ...], group) -> tuple[torch.Tensor, ...]:
    """copy_to_group of each tensor, with their gradients reduced in a single all-reduce."""
    out = _CopyManyToGroup.apply(group, *tensors)
    return out if isinstance(out, tuple) else (out,)


def reduce_from_group(x: torch.Tensor, group) -> torch.Tensor:
    return _ReduceFromGroup.apply(x, group)


def all_to_all(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
    """x: [sum(input_splits), ...] -> [sum(output_splits), ...]; rows input_splits[r] go to rank r."""
    return _AllToAll.apply(x, output_splits, input_splits, group)


def all_gather_along(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """Every rank's x concatenated along `dim` in rank order: [.., n, ..] -> [.., size * n, ..]."""
    size = dist.get_world_size(group)
    stacked = x.new_empty((size * x.shape[0], *x.shape[1:]))  # rank-major along dim 0 (what gloo takes)
    dist.all_gather_single(stacked, x.contiguous(), group=group)
    return stacked.unflatten(0, (size, -1)).movedim(0, dim).flatten(dim, dim + 1)


def reduce_scatter_along(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """The sum over ranks of x, this rank keeping its slice along `dim`: [.., size * n, ..] -> [.., n, ..]."""
    size = dist.get_world_size(group)
    by_rank = x.unflatten(dim, (size, -1)).movedim(dim, 0).contiguous()  # [size, .., n, ..]
    out = by_rank.new_empty(by_rank.shape[1:])
    dist.reduce_scatter_single(out, by_rank.flatten(0, 1), group=group)
    return out


def own_slice(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """This rank's slice of x along `dim` (the part reduce_scatter_along leaves it)."""
    return x.chunk(dist.get_world_size(group), dim)[dist.get_rank(group)]


class _GatherFromSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return all_gather_along(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        # Each rank's gradient is its part of the whole: sum them, each rank keeping its slice.
        return reduce_scatter_along(grad, ctx.group, ctx.dim), None, None


class _ReplicatedFromSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, shard, gathered, group, dim):
        ctx.group, ctx.dim = group, dim
        return gathered

    @staticmethod
    def backward(ctx, grad):
        # Every rank computed the same gradient for the whole sequence: its slice is all it needs.
        return own_slice(grad, ctx.group, ctx.dim), None, None, None


class _ReduceScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return reduce_scatter_along(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        # Every rank's partial output contributed to every slice with weight 1.
        return all_gather_along(grad, ctx.group, ctx.dim), None, None


def gather_from_sequence(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """x: this rank's slice of the sequence along `dim` -> the whole sequence, for work split over the
    ranks (each computes a part whose sum is the result)."""
    return _GatherFromSequence.apply(x, group, dim)


def replicated_from_sequence(shard: torch.Tensor, gathered: torch.Tensor, group, dim: int) -> torch.Tensor:
    """`gathered` (the detached result of gather_from_sequence(shard)) as an input of work every rank
    repeats identically; gradients reach `shard` as its slice of theirs. No communication either way."""
    return _ReplicatedFromSequence.apply(shard, gathered, group, dim)


def reduce_scatter_to_sequence(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """This rank's part of a whole-sequence result -> its slice along `dim` of the sum over ranks."""
    return _ReduceScatterToSequence.apply(x, group, dim)
