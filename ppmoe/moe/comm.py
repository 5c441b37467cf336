"""Autograd-aware collectives for the MoE dispatchers (Megatron's region semantics), on explicit groups.

copy_to_group:     forward identity,   backward all-reduce (sum)   -- enters a region where each rank
                                                                    computes a part of the result
copy_many_to_group: the same for several tensors, one all-reduce for all their gradients
reduce_from_group: forward all-reduce, backward identity           -- leaves that region
all_to_all:        forward all-to-all with split sizes, backward the reverse all-to-all
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
