"""Keeping generation out of the MoE layers' training statistics."""

from __future__ import annotations

import torch

from ..model import GPT
from ..moe import MoEFeedForward
from .steps import Step


def discarding_moe_records(model: GPT, step: Step) -> Step:
    """`step`, after which the routing records that the model's MoE layers appended are dropped.

    Every MoE forward appends a record to its layer's MoEStats.pending for the trainer to fold in; nothing
    reads them while generating, and one per layer per token would pile up over a long generation.
    Records that were there before (a trainer's) are kept.
    """
    kept = [(layer.stats, len(layer.stats.pending)) for layer in model.modules() if isinstance(layer, MoEFeedForward)]

    def run(tokens: torch.Tensor) -> torch.Tensor:
        logits = step(tokens)
        for stats, count in kept:
            del stats.pending[count:]
        return logits

    return run
