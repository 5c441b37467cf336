"""The MoE feed-forward block: router -> expert layout (dispatch, experts, combine) (+ optional shared expert)."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..layers import GatedSwiGLU, SwiGLU
from .aux_loss import attach_loss
from .experts import GroupedExperts
from .layout import LOCAL_EXPERTS, ExpertLayout
from .router import Routing, TopKRouter
from .shape import MoEShape


class MoEStats:
    """Detached per-layer statistics. Each forward appends a pending record; `commit` folds the records
    of real training micro-batches into the totals (a pipeline schedule also runs forwards of its own to
    infer shapes, which must not count), and the trainer reads and resets the totals at log steps."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]] = []
        self.reset()

    def reset(self) -> None:
        self.pending.clear()
        self.calls = 0
        self.aux_loss = 0.0
        self.z_loss = 0.0
        # (on the CPU even when the model is built on the meta device: statistics are never parameters)
        self.tokens_per_expert = torch.zeros(self.num_experts, dtype=torch.int64, device="cpu")
        self.assignments = 0

    def record(self, routing: Routing, aux_unscaled: torch.Tensor, z_unscaled: torch.Tensor) -> None:
        # Tensors stay on the device (no sync per layer); the trainer reads them at log steps.
        self.pending.append((aux_unscaled, z_unscaled, routing.tokens_per_expert, routing.expert_ids.numel()))

    def commit(self, keep_last: int | None = None) -> None:
        """Fold the last `keep_last` pending records (all when None) into the totals; drop the rest."""
        start = max(0, len(self.pending) - keep_last) if keep_last is not None else 0
        for aux, z, counts, assignments in self.pending[start:]:
            self.calls += 1
            self.aux_loss = self.aux_loss + aux
            self.z_loss = self.z_loss + z
            self.tokens_per_expert = self.tokens_per_expert.to(counts.device) + counts
            self.assignments += assignments
        self.pending.clear()


def build_shared_expert(d_model: int, shape: MoEShape) -> nn.Module | None:
    """The expert every token goes through (moe.shared_expert_hidden > 0), gated like Qwen2-MoE's when
    moe.shared_expert_gate is set; None without one."""
    if not shape.shared_expert_hidden:
        return None
    kind = GatedSwiGLU if shape.shared_expert_gate else SwiGLU
    return kind(d_model, shape.shared_expert_hidden)


class MoEFeedForward(nn.Module):
    """x [batch, seq, d_model] -> [batch, seq, d_model].

    `layout`: where the experts live and how tokens reach them (ppmoe.moe.layout; shared by all layers of
    a model). `aux_loss_scale`: the factor of the attached aux losses, the main loss's per micro-batch
    (ppmoe.config.BatchLayout.loss_scale), so they weigh the same whatever the accumulation.
    """

    def __init__(self, d_model: int, shape: MoEShape, layout: ExpertLayout = LOCAL_EXPERTS,
                 aux_loss_scale: float = 1.0, jitter_seed: int = 0):
        super().__init__()
        self.router = TopKRouter(d_model, shape.num_experts, shape.top_k, normalize_topk=shape.normalize_topk,
                                 jitter=shape.jitter, capacity_factor=shape.capacity_factor,
                                 aux_loss_coef=shape.aux_loss_coef, z_loss_coef=shape.z_loss_coef,
                                 jitter_seed=jitter_seed)
        self.experts = GroupedExperts(shape.num_experts, d_model, shape.expert_hidden, shape.expert_kernel)
        self.shared_expert = build_shared_expert(d_model, shape)
        self.layout = layout
        self.aux_loss_scale = aux_loss_scale
        self.stats = MoEStats(shape.num_experts)

    def side_effects(self) -> tuple[int, int]:
        """What one forward advances besides its output: (the router's jitter call counter, pending stats
        records). Activation checkpointing reads it before a forward and rewinds it around the backward's
        recompute (`rewind_side_effects`), so a recompute routes exactly as the forward did and records once."""
        return self.router.jitter_calls, len(self.stats.pending)

    def rewind_side_effects(self, state: tuple[int, int]) -> None:
        """Set the jitter counter to state[0] and drop the stats records after the first state[1]."""
        self.router.jitter_calls = state[0]
        del self.stats.pending[state[1]:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [batch, seq, d_model] -> [batch, seq, d_model] (under sequence parallelism, this rank's
        slice of the sequence in and out: its layout gathers and scatters)."""
        y, routing = self.layout.layer_forward(x, self.router, self.experts, self.shared_expert)
        self.stats.record(routing, routing.aux_loss.detach(), routing.z_loss.detach())
        if self.training:
            y = attach_loss(y, (routing.aux_loss + routing.z_loss) * self.aux_loss_scale)
        return y
