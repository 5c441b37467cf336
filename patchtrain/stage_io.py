"""What a stage's patch size changes in the trainer: the model's input, the loss and the data windows.

The trainer asks for the StageIO of each stage (and of the previous stage's objective, for the growth
probe) and uses it without knowing whether it reads patches."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from ppmoe.model.loss import LossFunction, build_loss

from .data import patch_window_len, to_patch_batch
from .embedding import enable_patch_input
from .loss import build_patch_loss


@dataclass
class StageIO:
    """loss_fn: the stage's LossFunction; window: the loader's seq_len (tokens per input row, one less than
    a sample's window); to_batch: loader batch -> (model input, loss targets); tokens_per_sequence:
    training tokens one sequence holds; hooks: the input hooks to remove when the stage ends."""

    loss_fn: LossFunction
    window: int
    to_batch: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    tokens_per_sequence: int
    hooks: list = field(default_factory=list)

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []


def stage_io(patch_size: int, parts: list[nn.Module], tp: int, device: torch.device, seq_len: int) -> StageIO:
    """K > 1: patch input hooks on the model parts that hold the embedding, the next-patch loss, K*T-token
    windows. K = 1: the model as it is, next-token loss, T-token windows."""
    if patch_size == 1:
        return StageIO(build_loss(tp), seq_len, lambda x, y: (x, y), seq_len)
    hooks = [h for h in (enable_patch_input(part, patch_size) for part in parts) if h is not None]
    return StageIO(build_patch_loss(tp, patch_size, device), patch_window_len(seq_len, patch_size),
                   lambda x, y: to_patch_batch(x, y, seq_len, patch_size), patch_size * seq_len, hooks)
