"""The next-patch loss on vocabulary-sharded logits (tensor parallelism) without gathering them or
expanding them K times: Megatron's vocab-parallel cross-entropy with K targets per row.

Each TP rank holds logits[:, r*V/T:(r+1)*V/T]. Per row: max and sum-exp are reduced over the group (two
all-reduces of N values) to the global log-sum-exp; each target logit lives on exactly one rank, so the
sum of the K target logits is a third all-reduce. Backward needs no communication:
grad_local = g/N * (softmax_local - count_local(v)/K).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


class _VocabParallelPatchCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local: torch.Tensor, targets: torch.Tensor, first: int, group) -> torch.Tensor:
        """local [N, V/T] float logits of this rank's vocabulary slice starting at `first`; targets [N, K]."""
        local = local.float()
        n, k = targets.shape
        row_max = local.max(dim=-1).values
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        shifted = local - row_max[:, None]
        sum_exp = shifted.exp().sum(dim=-1)
        dist.all_reduce(sum_exp, group=group)
        lse = row_max + sum_exp.log()  # [N]
        mine = (targets >= first) & (targets < first + local.shape[-1])
        picked = local.gather(-1, (targets - first).clamp(0, local.shape[-1] - 1)) * mine  # [N, K]
        picked_sum = picked.sum(dim=-1)
        dist.all_reduce(picked_sum, group=group)
        ctx.save_for_backward(shifted, sum_exp, targets, mine)
        ctx.first, ctx.k = first, k
        return (lse - picked_sum / k).mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        shifted, sum_exp, targets, mine = ctx.saved_tensors
        n = shifted.shape[0]
        g = shifted.exp() / sum_exp[:, None]  # local part of the softmax
        counts = torch.zeros_like(g).scatter_add_(
            -1, (targets - ctx.first).clamp(0, g.shape[-1] - 1), mine.to(g.dtype))
        return (g - counts / ctx.k) * (grad / n), None, None, None


def vocab_parallel_patch_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits: DTensor [N, V] sharded on the last dim over a 1-D TP mesh; targets [N, K] -> mean loss.
    Gradients flow back into the DTensor's local shard."""
    if not isinstance(logits, DTensor) or not logits.placements[-1].is_shard(logits.ndim - 1):
        raise TypeError("vocab_parallel_patch_cross_entropy needs logits sharded on the vocabulary dimension")
    mesh = logits.device_mesh
    local = logits.to_local()
    first = mesh.get_local_rank() * local.shape[-1]
    return _VocabParallelPatchCE.apply(local, targets, first, mesh.get_group())
