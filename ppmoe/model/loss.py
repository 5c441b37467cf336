"""Next-token cross-entropy, chosen at build time for the layout: plain, or vocab-parallel when the
logits are sharded over the vocabulary by tensor parallelism (torch's `loss_parallel`, which computes
the log-softmax from per-shard max and sum-exp without gathering the logits)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits [batch, seq, vocab] (plain or vocab-sharded DTensor), targets [batch, seq] -> mean loss."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def scalar_value(loss: torch.Tensor) -> torch.Tensor:
    """A detached plain 0-d tensor of the loss (a DTensor loss is replicated: its local value is full)."""
    return (loss.to_local() if isinstance(loss, DTensor) else loss).detach()


@dataclass(frozen=True)
class LossFunction:
    """`context` must enclose both the loss computation and its backward."""

    compute: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    context: Callable[[], ContextManager]


def build_loss(tp: int) -> LossFunction:
    return LossFunction(cross_entropy, loss_parallel if tp > 1 else contextlib.nullcontext)
