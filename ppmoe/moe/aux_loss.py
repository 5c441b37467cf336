"""Aux losses without globals: the router's loss is attached to the layer's output activation, so its
gradient flows in the ordinary backward pass (also through pipeline schedules, which only see
activations). Megatron does the same with its MoEAuxLossAutoScaler.

The attached loss is multiplied by the same factor as the main loss (1 / micro-batches), so its value
and gradient per optimizer step do not depend on gradient accumulation; data-parallel ranks average it
like the main loss; TP ranks compute identical copies and add no reduction.
"""

from __future__ import annotations

import torch


class _AttachLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, output, loss):
        ctx.loss_shape, ctx.loss_dtype = loss.shape, loss.dtype
        return output

    @staticmethod
    def backward(ctx, grad):
        # d(total loss)/d(attached loss) = 1: the loss counts as if it were added to the objective.
        return grad, torch.ones(ctx.loss_shape, dtype=ctx.loss_dtype, device=grad.device)


def attach_loss(output: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """Identity on `output`; backward also back-propagates `loss` (a 0-d tensor) with gradient 1."""
    return _AttachLoss.apply(output, loss)
