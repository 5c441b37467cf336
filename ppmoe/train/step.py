"""One optimizer step's forward/backward over micro-batches (without pipelining). Precision is not chosen
here: the data-parallel wrapper casts the parameters (ppmoe.parallel.mixed_precision)."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..config import BatchLayout
from ..parallel import set_gradient_sync
from ..model.loss import LossFunction, scalar_value


def forward_backward(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, batch: BatchLayout,
                     loss_fn: LossFunction) -> torch.Tensor:
    """Accumulate gradients of the mean loss over this rank's batch.

    inputs/targets: [batch.local_batch, seq], run as batch.micro_batches micro-batches. Each micro-batch's
    loss is divided by the number of micro-batches, so the gradient equals that of the whole batch's mean (all micro-batches have the same token count). Data-parallel reduction (an average)
    happens once, on the last micro-batch. Returns this rank's mean loss (plain 0-d tensor, detached).
    """
    chunks = list(zip(inputs.split(batch.micro_batch), targets.split(batch.micro_batch)))
    total = torch.zeros((), device=inputs.device)
    for i, (x, y) in enumerate(chunks):
        set_gradient_sync(model, i == len(chunks) - 1)
        with loss_fn.context():
            # No name holds the logits: the loss keeps what its backward needs (the fp32 log-softmax), and
            # the [micro_batch, seq, vocab] logits are freed before the backward starts.
            loss = loss_fn.compute(model(x), y)
            (loss / batch.micro_batches).backward()
        total += scalar_value(loss)
    return total / batch.micro_batches
