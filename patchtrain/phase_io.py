"""What a training phase changes in the trainer: the model's input, the loss and the data windows.

The trainer asks for the PhaseIO of each phase and uses it without knowing which phase it is in."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from .data import patch_window_len, to_patch_batch
from .embedding import enable_patch_input
from .loss import build_patch_loss
from .schedule import Phase


@dataclass
class PhaseIO:
    """loss_fn: a ppmoe LossFunction; window: the loader's seq_len for this phase; to_batch: loader batch ->
    (model input, loss targets); tokens_per_sequence: training tokens one sequence holds; hooks: the
    input hooks to remove when the phase ends."""

    loss_fn: object
    window: int
    to_batch: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    tokens_per_sequence: int
    hooks: list = field(default_factory=list)

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []


def phase_io(phase: Phase, parts: list[nn.Module], tp: int, device: torch.device, seq_len: int) -> PhaseIO:
    """Patch phase: patch input hooks on the model parts that hold the embedding, the next-patch loss,
    K*T-token windows. Token phase: the model as it is, next-token loss, T-token windows."""
    from ppmoe.train.loss import build_loss

    k = phase.patch_size
    if phase.name != "patch":
        return PhaseIO(build_loss(tp), seq_len, lambda x, y: (x, y), seq_len)
    hooks = [h for h in (enable_patch_input(part, k) for part in parts) if h is not None]
    return PhaseIO(build_patch_loss(tp, k, device), patch_window_len(seq_len, k),
                   lambda x, y: to_patch_batch(x, y, seq_len, k), k * seq_len, hooks)
