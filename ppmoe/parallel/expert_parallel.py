"""The expert step of parallelising a model: each MoE layer's expert layout (ppmoe.moe.layout, given to
the layer when the model was built) places its experts' weights. Runs after tensor parallelism (which
leaves the experts alone) and before data parallelism (which must skip the parameters a layout hands
to a single data-parallel rank). The router gate stays replicated: every rank of a TP group must make
the same routing decision."""

from __future__ import annotations

import torch.nn as nn

from ..moe import MoEFeedForward


def apply_expert_layout(model: nn.Module) -> set[nn.Parameter]:
    """Place the experts of every MoE layer of `model` (one pipeline stage, or the whole model) as its
    layout says. Returns the parameters data parallelism must leave alone."""
    owned: set[nn.Parameter] = set()
    for module in model.modules():
        if isinstance(module, MoEFeedForward):
            owned.update(module.layout.distribute(module.experts))
    return owned


def prepare_expert_gradients(model: nn.Module) -> None:
    """Each MoE layer's layout sets up its experts' gradient handling, once the weights have storage."""
    for module in model.modules():
        if isinstance(module, MoEFeedForward):
            module.layout.prepare_gradients(module.experts)
