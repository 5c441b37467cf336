"""All experts on this rank; no communication. The single-process reference for the other layouts."""

from __future__ import annotations

import torch

from ..experts import GroupedExperts
from ..permute import combine, sort_by_expert
from ..router import Routing
from .base import ExpertLayout


class LocalExperts(ExpertLayout):
    name = "local"

    def __call__(self, x: torch.Tensor, routing: Routing, experts: GroupedExperts) -> torch.Tensor:
        """x: [T, d] -> [T, d] = sum over kept choices of gate weight * expert(x)."""
        token_index, slot, counts = sort_by_expert(routing.expert_ids, routing.keep, 0, experts.num_experts)
        y = experts(x[token_index], counts)
        return combine(y, token_index, routing.weights.flatten()[slot], x.shape[0])


LOCAL_EXPERTS = LocalExperts()
