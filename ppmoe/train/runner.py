"""How one rank runs forward/backward for a batch: all layers here, or its stages of a pipeline.

Chosen once per stage (ppmoe.train.parallelize). Both take this rank's batch ([local_batch, seq] inputs
and targets), split it into the micro-batches its BatchLayout says, and return
the mean loss over them as seen by this rank: a real value where the loss is computed (everywhere
without pipelining, the last stage with it) and 0 elsewhere (`holds_loss` says which).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from ..config import BatchLayout
from ..model.loss import LossFunction, scalar_value
from ..parallel.tied_embeddings import TiedAcrossRanks, TiedOnOneRank, Untied
from .moe_metrics import commit_moe_stats
from .step import forward_backward


class SingleStageRunner:
    """Every layer on this rank: gradient accumulation over micro-batches."""

    holds_loss = True

    def __init__(self, model: nn.Module, batch: BatchLayout, loss_fn: LossFunction):
        self.model, self.parts = model, [model]
        self.batch, self.loss_fn = batch, loss_fn

    def set_loss(self, loss_fn: LossFunction) -> None:
        self.loss_fn = loss_fn

    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = forward_backward(self.model, inputs, targets, self.batch, self.loss_fn)
        commit_moe_stats(self.parts)
        return loss

    @torch.no_grad()
    def eval_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        total = torch.zeros((), device=inputs.device)
        for x, y in zip(inputs.split(self.batch.micro_batch), targets.split(self.batch.micro_batch)):
            with self.loss_fn.context():
                total += scalar_value(self.loss_fn.compute(self.model(x), y))
        return total / self.batch.micro_batches


class PipelineRunner:
    """This rank's pipeline stages driven by a torch.distributed.pipelining schedule. The micro-batches
    of gradient accumulation are the pipeline's micro-batches. `tie` keeps a tied embedding's two copies
    (first and last stage) equal: ppmoe.parallel.tied_embeddings."""

    def __init__(self, parts: list[nn.Module], is_last: bool, batch: BatchLayout, loss_fn: LossFunction,
                 make_schedule: Callable[[Callable], object],
                 tie: Untied | TiedAcrossRanks | TiedOnOneRank = Untied()):
        self.parts, self.holds_loss = parts, is_last
        self.batch, self.loss_fn = batch, loss_fn
        self.make_schedule, self.tie = make_schedule, tie
        self.schedule = make_schedule(self.microbatch_loss)

    def set_loss(self, loss_fn: LossFunction) -> None:
        """A new objective (patch -> token level): the stages see new shapes, so build a new schedule."""
        self.loss_fn = loss_fn
        self.schedule = self.make_schedule(self.microbatch_loss)

    def microbatch_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Called by the schedule on the last stage. Divided by the micro-batch count like the
        non-pipelined path (the schedule is built not to rescale gradients)."""
        return self.loss_fn.compute(output, target) / self.batch.micro_batches

    def run(self, step: Callable, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # The schedule reports the loss of each micro-batch it ran (it may call loss_fn more often, e.g.
        # when it sets itself up, so counting our own calls would be wrong).
        losses: list[torch.Tensor] = []
        with self.loss_fn.context():
            step(inputs, target=targets, losses=losses)
        if not losses:
            return torch.zeros((), device=inputs.device)
        return torch.stack([scalar_value(loss) for loss in losses]).sum()

    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.tie.before_step()
        loss = self.run(self.schedule.step, inputs, targets)
        self.tie.after_backward()  # before the trainer clips: the tied weight's whole gradient on both copies
        # The schedule's shape-inference forwards come before the micro-batches: keep the last ones.
        commit_moe_stats(self.parts, keep_last=self.batch.micro_batches)
        return loss

    @torch.no_grad()
    def eval_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.tie.before_step()
        return self.run(self.schedule.eval, inputs, targets)
