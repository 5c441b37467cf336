"""Pipeline-MoE (Chen et al., 2023): experts partitioned over the tensor-parallel group.

The tokens entering the FFN are already replicated on every TP rank, and so is the gate, so every rank
computes the same routing. Rank r owns experts [r*E/T, (r+1)*E/T):
  1. select the assignments to its own experts by index slicing (no communication),
  2. run its experts on those tokens,
  3. scale by the gate weights and scatter into a zero [T, d] tensor,
  4. one all-reduce (sum) over the TP group combines the partial outputs.
Backward mirrors Megatron's copy/reduce pair: the all-reduce's backward is the identity; the expert
inputs and gate weights enter through copy_many_to_group, whose backward all-reduces their gradients
(each rank only sees the gradient through its own experts) in one collective of T x (d + k) values. The router's own aux losses are computed
identically on every rank and need no reduction. No all-to-all anywhere; the one all-reduce has the
size (T x d) a dense row-parallel FFN already pays.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..comm import copy_many_to_group, reduce_from_group
from ..experts import GroupedExperts
from ..permute import combine, sort_by_expert
from ..router import Routing


class PipelineDispatcher:
    def __init__(self, tp_group: dist.ProcessGroup, num_experts: int):
        size = dist.get_world_size(tp_group)
        if num_experts % size:
            raise ValueError(f"moe.num_experts={num_experts} must be divisible by parallel.tp={size} "
                             f"(Pipeline-MoE gives each TP rank whole experts)")
        self.group = tp_group
        self.per_rank = num_experts // size
        self.first = dist.get_rank(tp_group) * self.per_rank

    def __call__(self, x: torch.Tensor, routing: Routing, experts: GroupedExperts) -> torch.Tensor:
        """x: [T, d], replicated over the TP group -> [T, d], replicated."""
        # One backward all-reduce for both the input and the gate-weight gradients.
        x, weights = copy_many_to_group((x, routing.weights), self.group)
        token_index, slot, counts = sort_by_expert(routing.expert_ids, routing.keep, self.first,
                                                   self.first + self.per_rank)
        y = experts(x[token_index], counts)
        partial = combine(y, token_index, weights.flatten()[slot], x.shape[0])
        return reduce_from_group(partial, self.group)
