"""Experts in the TP group: Pipeline-MoE (Chen et al., 2023), experts partitioned over the tensor-parallel
group (`moe.dispatcher: experts_in_tp`; the paper's "pipeline" is not pipeline parallelism).

Weights: w1/w3/w2 become DTensors sharded along the expert dimension over the TP group (each TP rank
stores E/T whole experts; data parallelism then treats them like any TP-sharded weight).
The tokens entering the FFN are already replicated on every TP rank, and so is the gate, so every rank
computes the same routing. Rank r owns experts [r*E/T, (r+1)*E/T):
  1. select the assignments to its own experts by index slicing (no communication),
  2. run its experts on those tokens,
  3. scale by the gate weights and scatter into a zero [T, d] tensor,
  4. one all-reduce (sum) over the TP group combines the partial outputs.
Backward mirrors Megatron's copy/reduce pair: the all-reduce's backward is the identity; the expert
inputs and gate weights enter through copy_many_to_group, whose backward all-reduces their gradients
(each rank only sees the gradient through its own experts) in one collective of T x (d + k) values.
The router's own aux losses are computed identically on every rank and need no reduction. No all-to-all anywhere; the one all-reduce has the
size (T x d) a dense row-parallel FFN already pays.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh

from ..comm import copy_many_to_group, reduce_from_group
from ..experts import GroupedExperts
from ..permute import combine, sort_by_expert
from ..router import Routing
from .base import ExpertLayout, shard_experts


class ExpertsInTP(ExpertLayout):
    """`tp_mesh`: the 1-D tensor-parallel mesh; moe.num_experts divides by its size (a config rule)."""

    name = "experts_in_tp"

    def __init__(self, tp_mesh: DeviceMesh, num_experts: int):
        self.mesh, self.group, self.num_experts = tp_mesh, tp_mesh.get_group(), num_experts
        self.per_rank = num_experts // tp_mesh.size()
        self.first = tp_mesh.get_local_rank() * self.per_rank

    def distribute(self, experts: GroupedExperts) -> list[nn.Parameter]:
        shard_experts(experts, self.mesh)
        return []

    def __call__(self, x: torch.Tensor, routing: Routing, experts: GroupedExperts) -> torch.Tensor:
        """x: [T, d], replicated over the TP group -> [T, d], replicated."""
        # One backward all-reduce for both the input and the gate-weight gradients.
        x, weights = copy_many_to_group((x, routing.weights), self.group)
        return reduce_from_group(self.own_experts(x, weights, routing, experts), self.group)

    def own_experts(self, x: torch.Tensor, weights: torch.Tensor, routing: Routing, experts: GroupedExperts
                    ) -> torch.Tensor:
        """This rank's part of the mix: x [T, d] (all tokens), weights [T, k] (the gate weights) ->
        [T, d], the gate-weighted outputs of its own experts (zero for tokens that chose none of them)."""
        token_index, slot, counts = sort_by_expert(routing.expert_ids, routing.keep, self.first,
                                                   self.first + self.per_rank)
        y = experts(x[token_index], counts)
        return combine(y, token_index, weights.flatten()[slot], x.shape[0])
