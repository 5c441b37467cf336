"""MoE observability for the trainer: aux/z losses, per-expert load, dropped tokens, imbalance warning."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from ..moe.layer import MoEFeedForward


def moe_layers(model: nn.Module) -> list[MoEFeedForward]:
    return [m for m in model.modules() if isinstance(m, MoEFeedForward)]


def set_aux_loss_scale(model: nn.Module, scale: float) -> None:
    """Scale the attached aux losses like the main loss (1 / micro-batches per step)."""
    for layer in moe_layers(model):
        layer.loss_scale = scale


class MoEMonitor:
    """Reads and resets the layers' MoEStats at log steps, reduced over the data-parallel group."""

    def __init__(self, model: nn.Module, dp_group, warn_ratio: float, warn_steps: int, log):
        self.layers = moe_layers(model)
        self.dp_group, self.warn_ratio, self.warn_steps, self.log = dp_group, warn_ratio, warn_steps, log
        self.streak = [0] * len(self.layers)

    def reset(self) -> None:
        for layer in self.layers:
            layer.stats.reset()

    def collect(self, steps: int, device: torch.device) -> dict:
        """Metrics since the last reset: aux_loss and z_loss (mean per layer and micro-batch, unscaled by
        the coefficient's step factor), expert_load ([layer][expert] share of kept assignments),
        dropped_frac. `steps` is how many optimizer steps the window covered (for the warning)."""
        if not self.layers:
            return {}
        rows = []
        for layer in self.layers:
            s = layer.stats
            calls = max(s.calls, 1)
            rows.append(torch.cat([s.tokens_per_expert.to(device, torch.float64),
                                   torch.tensor([float(s.aux_loss) / calls, float(s.z_loss) / calls,
                                                 float(s.assignments)], dtype=torch.float64, device=device)]))
        table = torch.stack(rows)  # [layers, E + 3]
        if self.dp_group is not None and dist.get_world_size(self.dp_group) > 1:
            dist.all_reduce(table, group=self.dp_group)
            table[:, -3:-1] /= dist.get_world_size(self.dp_group)  # losses average, counts add up
        self.reset()
        counts = table[:, :-3]
        kept = counts.sum(dim=1)
        load = counts / kept.clamp(min=1)[:, None]
        self.warn_on_imbalance(load, steps)
        return {"aux_loss": float(table[:, -3].mean()), "z_loss": float(table[:, -2].mean()),
                "dropped_frac": float(1 - kept.sum() / table[:, -1].sum().clamp(min=1)),
                "expert_load": [[round(v, 4) for v in row] for row in load.tolist()]}

    def warn_on_imbalance(self, load: torch.Tensor, steps: int) -> None:
        num_experts = load.shape[1]
        for i, row in enumerate(load):
            ratio = float(row.max()) * num_experts
            if ratio > self.warn_ratio:
                self.streak[i] += steps
                if self.streak[i] >= self.warn_steps and self.streak[i] - steps < self.warn_steps:
                    self.log(f"warning: MoE layer {i}: expert {int(row.argmax())} has taken {ratio:.1f}x its "
                             f"share of tokens for {self.streak[i]} steps (raise moe.aux_loss_coef, or add "
                             f"moe.jitter, if it persists)")
            else:
                self.streak[i] = 0
