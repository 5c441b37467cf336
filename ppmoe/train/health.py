"""Training health: steps with non-finite losses or gradients, loss spikes, and a last check that a state is
finite before it is saved.

A step is judged by its global gradient norm. Every rank's loss and gradients feed that one number (a NaN
or inf loss anywhere makes its gradients NaN, which the all-reduced norm carries to every rank), so all
ranks reach the same verdict without a collective of their own, and the optimizer never sees the step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from ..errors import NonFiniteError

Action = Literal["continue", "rollback"]


@dataclass
class NonFiniteGuard:
    """train.nonfinite's policy: counts bad steps in a row and rollbacks, and says what comes next."""

    policy: Literal["skip", "stop", "rollback"]
    limit: int
    in_a_row: int = 0
    rollbacks: int = 0

    def good_step(self) -> None:
        self.in_a_row = 0

    def bad_step(self, step: int, grad_norm: float, last_checkpoint: str) -> Action:
        """Step `step` had a non-finite gradient norm (its update was dropped). Raises NonFiniteError when
        the policy says stop."""
        self.in_a_row += 1
        where = f"step {step}: the loss or gradients are not finite (gradient norm {grad_norm})"
        advice = (f"lower train.lr, raise train.warmup_steps or tighten train.grad_clip, then resume from the newest "
                  f"checkpoint ({last_checkpoint}; if it meets non-finite steps again, the state was already broken "
                  f"when it was saved: resume from an older one with train.resume=PATH)")
        if self.policy == "stop":
            raise NonFiniteError(f"{where}; stopping (train.nonfinite=stop): {advice}")
        if self.in_a_row < self.limit:
            return "continue"
        if self.policy == "skip":
            raise NonFiniteError(f"{where}, {self.in_a_row} steps in a row (train.nonfinite_max={self.limit}); "
                                 f"stopping: {advice}")
        self.rollbacks += 1
        if self.rollbacks > self.limit:
            raise NonFiniteError(f"{where}, again after {self.limit} rollbacks (train.nonfinite_max); stopping: "
                                 f"{advice}")
        self.in_a_row = 0
        return "rollback"


@dataclass
class LossSpikeMonitor:
    """Flags a logged loss far above the moving average of the earlier ones (factor 0: off)."""

    factor: float
    decay: float = 0.9
    average: float | None = None

    def observe(self, loss: float) -> float | None:
        """The moving average the loss spiked above, or None."""
        if not math.isfinite(loss):
            return None  # the non-finite guard reports those
        spiked = self.average if (self.factor and self.average is not None and loss > self.factor * self.average) \
            else None
        self.average = loss if self.average is None else self.decay * self.average + (1 - self.decay) * loss
        return spiked


@torch.no_grad()
def state_is_finite(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> bool:
    """Whether every parameter and optimizer tensor is finite on every rank (collective: all ranks call it).
    The last guard before a save: nothing non-finite is ever written."""
    bad = torch.zeros((), dtype=torch.float32)
    tensors = list(model.parameters()) + [v for s in optimizer.state.values() for v in s.values()
                                          if torch.is_tensor(v)]
    for tensor in tensors:
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        if local.numel() and not bool(torch.isfinite(local).all()):
            bad.fill_(1.0)
            break
    bad = bad.to(tensors[0].device) if tensors else bad
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return not bool(bad)
