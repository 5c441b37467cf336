"""A tied embedding under pipeline parallelism, as Megatron ties it.

With model.tie_embeddings the single-process GPT uses one matrix [vocab, d_model] twice: to look tokens up
(first stage) and to project onto the vocabulary (last stage). Split into stages, each end holds its own
copy, both starting from the same values. After each backward (before clipping and the optimizer step)
the two copies' gradients are summed, so each holds the gradient of the tied weight; identical optimizer
steps then keep them equal, bit for bit.

- The ends on two ranks (1F1B, GPipe, the interleaved schedules): the gradients are all-reduced over a
  group of those two ranks, one group per (dp, tp) coordinate: both copies are sharded alike by TP
  (vocabulary rows) and FSDP, so the local shards line up. The head's copy is left out of the gradient
  norm (ppmoe.parallel.grad_norm.count_elsewhere).
- Both ends on one rank (the V placement of zbv and dualpipev: rank 0 runs the first and the last
  stage): the head's copy follows the embedding. Its gradient is added to the embedding's, and before
  each step its values are overwritten with the embedding's; the optimizer and checkpoints see only the
  embedding (StageUnion). One Parameter shared by the two stage modules would need the tensor- and
  data-parallel steps, which wrap each stage on its own, to keep it shared; the follower needs nothing
  of them.

Checkpoints hold both names, tok_embeddings.weight and output.weight, with the optimizer state under
tok_embeddings.weight, as the single-process tied model's do (StageUnion presents each rank's copy so).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from ..config import ParallelConfig
from .grad_norm import count_elsewhere
from .pipeline import rank_of_stage


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a (TP / FSDP) DTensor, itself otherwise; call under no_grad (a view to write to)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def grad_laid_out_as_param(param: nn.Parameter) -> torch.Tensor:
    """`param`'s gradient, in `param`'s own layout (set back as its .grad): under TP the embedding's
    gradient comes back replicated although its weight is sharded by vocabulary rows, and the two ends'
    shards must line up."""
    grad = param.grad
    if isinstance(grad, DTensor) and grad.placements != param.placements:
        grad = grad.redistribute(param.device_mesh, param.placements)  # replicated -> shard: a local slice
        param.grad = grad
    return grad


class Untied:
    """No tie to keep on this rank (untied model, or a middle pipeline rank)."""

    def before_step(self) -> None:
        pass

    def after_backward(self) -> None:
        pass


class TiedAcrossRanks:
    """This rank holds one end of the tie; `group` holds this rank and the one with the other end."""

    def __init__(self, weight: nn.Parameter, group: dist.ProcessGroup, embedding_rank: int):
        self.weight, self.group = weight, group
        with torch.no_grad():  # the same start values, whatever each rank's initialisation gave
            dist.broadcast(local_part(weight), src=embedding_rank, group=group)

    def before_step(self) -> None:
        pass

    @torch.no_grad()
    def after_backward(self) -> None:
        if self.weight.grad is None:  # never the case in training; the other end must not wait forever
            self.weight.grad = torch.zeros_like(self.weight)
        dist.all_reduce(local_part(grad_laid_out_as_param(self.weight)), group=self.group)


class TiedOnOneRank:
    """Both ends here: `head` (the output projection's copy) follows `embedding`."""

    def __init__(self, embedding: nn.Parameter, head: nn.Parameter):
        self.embedding, self.head = embedding, head
        self.before_step()

    @torch.no_grad()
    def before_step(self) -> None:
        local_part(self.head).copy_(local_part(self.embedding))

    @torch.no_grad()
    def after_backward(self) -> None:
        if self.head.grad is None:
            return
        grad = grad_laid_out_as_param(self.head)
        self.head.grad = None
        if self.embedding.grad is None:
            self.embedding.grad = grad
        else:
            local_part(grad_laid_out_as_param(self.embedding)).add_(local_part(grad))


def tie_pipeline_ends(parts: list[nn.Module], mesh: DeviceMesh, par: ParallelConfig
                      ) -> Untied | TiedAcrossRanks | TiedOnOneRank:
    """The tie this rank keeps between the first stage's embedding and the last stage's head (its stage
    modules `parts`, tensor- and data-parallel already). Collective over the whole mesh: the groups of
    the two end ranks are made on every rank, in the same order."""
    if not parts[0].shape.tie_embeddings:
        return Untied()
    embedding = next((p.tok_embeddings.weight for p in parts if p.tok_embeddings is not None), None)
    head = next((p.output.weight for p in parts if p.output is not None), None)
    first_rank, last_rank = 0, rank_of_stage(par.pp * par.pp_virtual_stages - 1, par)
    if first_rank == last_rank:
        return TiedOnOneRank(embedding, head) if embedding is not None else Untied()
    ranks = mesh.mesh  # [pp, dp, tp] global ranks
    pairs = [[int(ranks[first_rank, d, t]), int(ranks[last_rank, d, t])]
             for d in range(ranks.shape[1]) for t in range(ranks.shape[2])]
    group, _ = dist.new_subgroups_by_enumeration(pairs)
    mine = next((pair for pair in pairs if dist.get_rank() in pair), None)
    if embedding is not None:
        return TiedAcrossRanks(embedding, group, embedding_rank=mine[0])
    if head is not None:
        count_elsewhere(head)
        return TiedAcrossRanks(head, group, embedding_rank=mine[0])
    return Untied()
