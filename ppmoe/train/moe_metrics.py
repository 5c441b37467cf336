"""MoE observability for the trainer: aux/z losses, per-expert load, dropped tokens, imbalance warning."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from ..moe import MoEFeedForward


def commit_moe_stats(parts: list[nn.Module], keep_last: int | None = None) -> None:
    """After a training step: count the last `keep_last` forwards of each MoE layer (all when None)."""
    for part in parts:
        for layer in part.modules():
            if isinstance(layer, MoEFeedForward):
                layer.stats.commit(keep_last)


class MoEMonitor:
    """Reads and resets the MoE layers' stats at log steps. Rows of the table are the model's MoE layers
    (all of them, in order); a pipeline stage fills its own and the stages' tables are summed over the
    pipeline group, then averaged (losses) or summed (counts) over the data-parallel group, so what is
    logged does not depend on the layout."""

    def __init__(self, layers: nn.ModuleDict, moe_layer_ids: list[int], num_experts: int, pp_group, dp_group,
                 warn_ratio: float, warn_steps: int, log):
        self.local = {int(name): block.feed_forward for name, block in layers.items()
                      if isinstance(block.feed_forward, MoEFeedForward)}
        self.rows = {layer_id: row for row, layer_id in enumerate(moe_layer_ids)}
        self.num_experts, self.pp_group, self.dp_group = num_experts, pp_group, dp_group
        self.warn_ratio, self.warn_steps, self.log = warn_ratio, warn_steps, log
        self.streak = [0] * len(moe_layer_ids)

    def reset(self) -> None:
        for layer in self.local.values():
            layer.stats.reset()

    def collect(self, steps: int, device: torch.device) -> dict:
        """Metrics since the last reset: aux_loss and z_loss (mean per layer and micro-batch, unscaled by
        the coefficient's step factor), expert_load ([layer][expert] share of kept assignments),
        dropped_frac. `steps` is how many optimizer steps the window covered (for the warning)."""
        if not self.rows:
            return {}
        table = torch.zeros(len(self.rows), self.num_experts + 3, dtype=torch.float64, device=device)
        for layer_id, layer in self.local.items():
            s = layer.stats
            calls = max(s.calls, 1)
            table[self.rows[layer_id]] = torch.cat([
                s.tokens_per_expert.to(device, torch.float64),
                torch.tensor([float(s.aux_loss) / calls, float(s.z_loss) / calls, float(s.assignments)],
                             dtype=torch.float64, device=device)])
        if self.pp_group is not None and dist.get_world_size(self.pp_group) > 1:
            dist.all_reduce(table, group=self.pp_group)  # each stage filled only its own rows
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
