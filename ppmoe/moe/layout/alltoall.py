"""Classic expert parallelism (GShard / DeepSpeed-MoE): experts spread over an expert-parallel group
(the data-parallel ranks), tokens moved there and back with two all-to-alls. The baseline Pipeline-MoE
is measured against (`moe.dispatcher: alltoall`, at tp 1).

Weights: sharded by whole experts over the data-parallel group, so each expert is owned by one DP rank:
they are kept out of the DP gradient reduction, and their gradient, which the all-to-all backward
already sums over all DP ranks' losses, is divided by dp to match the averaged loss.

Each rank routes its own tokens. Rank p owns experts [p*E/P, (p+1)*E/P):
  1. sort local assignments by expert (so destination ranks are contiguous),
  2. all-to-all the per-expert counts, then the tokens (dispatch),
  3. regroup received tokens (source-major) by local expert and run the experts,
  4. undo the regrouping and all-to-all the outputs back (combine), then scale and scatter locally.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh

from ..comm import all_to_all
from ..experts import GroupedExperts
from ..permute import combine, sort_by_expert
from ..router import Routing
from .base import EXPERT_WEIGHTS, ExpertLayout, shard_experts


class AllToAllExperts(ExpertLayout):
    """`ep_mesh`: the 1-D expert-parallel mesh (the data-parallel ranks); moe.num_experts divides by its
    size (a config rule)."""

    name = "alltoall"

    def __init__(self, ep_mesh: DeviceMesh, num_experts: int):
        self.mesh, self.group, self.size = ep_mesh, ep_mesh.get_group(), ep_mesh.size()
        self.per_rank, self.num_experts = num_experts // self.size, num_experts

    def distribute(self, experts: GroupedExperts) -> list[nn.Parameter]:
        return shard_experts(experts, self.mesh)

    def prepare_gradients(self, experts: GroupedExperts) -> None:
        for name in EXPERT_WEIGHTS:
            getattr(experts, name).register_hook(lambda grad: grad / self.size)

    def __call__(self, x: torch.Tensor, routing: Routing, experts: GroupedExperts) -> torch.Tensor:
        """x: [T, d] this rank's tokens -> [T, d]."""
        token_index, slot, counts = sort_by_expert(routing.expert_ids, routing.keep, 0, self.num_experts)
        send_counts = torch.tensor(counts, dtype=torch.int64, device=x.device).view(self.size, self.per_rank)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)  # [source rank, local expert]
        input_splits = send_counts.sum(1).tolist()
        output_splits = recv_counts.sum(1).tolist()
        received = all_to_all(x[token_index], output_splits, input_splits, self.group)

        expert_of_row = torch.repeat_interleave(torch.arange(self.per_rank, device=x.device).repeat(self.size), recv_counts.flatten())
        by_expert = torch.argsort(expert_of_row, stable=True)
        y = experts(received[by_expert], recv_counts.sum(0).tolist())
        y_source_major = torch.empty_like(y).index_copy(0, by_expert, y)

        returned = all_to_all(y_source_major, input_splits, output_splits, self.group)
        return combine(returned, token_index, routing.weights.flatten()[slot], x.shape[0])
