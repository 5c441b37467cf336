"""Activation checkpointing (`train.activation_checkpointing`, `train.ac_every`), applied to a model from
outside after tensor parallelism and before data parallelism (torchtitan's order TP -> AC -> compile -> FSDP).

The three modes, chosen per block when the model is parallelised (never checked inside forward()):
- 'full': every transformer block keeps only its input; its whole forward is recomputed in the backward.
- 'selective', ac_every = n >= 1: blocks n-1, 2n-1, ... (by their index in the whole model, so a pipeline
  split checkpoints the same blocks) are checkpointed whole, the others keep everything.
- 'selective', ac_every = 0: per-op, on every block: the outputs of the expensive ops (matmuls, grouped
  GEMMs, attention, DTensor's collectives: SAVED_OPS) are kept, the cheap elementwise ops and norms
  recomputed. Memory between none and full, recompute cost a few percent of the step.

How: `block.forward` becomes a function that runs the class's forward under
torch.utils.checkpoint.checkpoint (non-reentrant). It is an instance attribute, so the module tree,
parameter names and checkpoint keys are those of the plain model (torch's checkpoint_wrapper would add
`_checkpoint_wrapped_module.` to every name), and a checkpoint written with AC on loads with AC off.
FSDP2's hooks sit on the block's __call__, outside the recompute; its pre-backward hook unshards the
parameters before the recompute needs them.

MoE blocks: a forward has side effects a recompute must not repeat (ppmoe.moe.layer.MoEFeedForward
.side_effects): the router's jitter noise comes from a generator seeded by a call counter, and each
forward appends a stats record. The checkpoint's context pair rewinds the counter to its value at the
forward for the recompute (same noise, so the same routing, token counts and all-to-all split sizes) and
drops the recompute's stats record. The MoE dispatchers' own collectives (ppmoe.moe.comm, in-place c10d
ops whose results are read from their input) cannot be replayed from a cache: under per-op selective
they run again in the recompute, as under full; every rank of the group recomputes in the same order.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator

import torch
import torch.nn as nn
from torch.utils.checkpoint import (CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts,
                                    noop_context_fn)

from ..moe import MoEFeedForward


def resolve_ops(names: list[str]) -> frozenset:
    """The default overloads of 'namespace.op' names this torch build has (some are GPU- or version-specific)."""
    ops = set()
    for name in names:
        namespace, op = name.split(".")
        packet = getattr(getattr(torch.ops, namespace), op, None)
        if packet is not None:
            ops.add(packet.default)
    return frozenset(ops)


# Per-op selective: keep these outputs. Matmuls and attention are where the FLOPs are; collectives are
# kept so the recompute never communicates (DTensor's TP collectives are these functional ops).
SAVED_OPS = resolve_ops([
    "aten.mm", "aten.addmm", "aten.bmm", "aten._grouped_mm",
    "aten._scaled_dot_product_flash_attention", "aten._scaled_dot_product_efficient_attention",
    "aten._scaled_dot_product_cudnn_attention", "aten._scaled_dot_product_flash_attention_for_cpu",
    "_c10d_functional.all_reduce", "_c10d_functional.reduce_scatter_tensor",
    "_c10d_functional.all_gather_into_tensor", "_c10d_functional.all_to_all_single",
    "_c10d_functional.wait_tensor",
])


def save_expensive_ops(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def per_op_contexts() -> tuple:
    """(forward context, recompute context) of per-op selective checkpointing."""
    return create_selective_checkpoint_contexts(save_expensive_ops)


def moe_replay_contexts(moe_layers: list[MoEFeedForward], inner: Callable[[], tuple]) -> tuple:
    """`inner`'s context pair, plus rewinding the MoE layers' side effects for the recompute (see the
    module docstring)."""
    at_forward: list[tuple[int, int]] = []

    @contextlib.contextmanager
    def forward(inner_forward) -> Iterator[None]:
        at_forward[:] = [layer.side_effects() for layer in moe_layers]
        with inner_forward:
            yield

    @contextlib.contextmanager
    def recompute(inner_recompute) -> Iterator[None]:
        now = [layer.side_effects() for layer in moe_layers]
        for layer, (calls, _), (_, pending) in zip(moe_layers, at_forward, now):
            layer.rewind_side_effects((calls, pending))
        try:
            with inner_recompute:
                yield
        finally:
            for layer, state in zip(moe_layers, now):
                layer.rewind_side_effects(state)

    inner_forward, inner_recompute = inner()
    return forward(inner_forward), recompute(inner_recompute)


# An MoE block's checkpoint runs eagerly under torch.compile: dynamo cannot trace its replay contexts
# (Python side effects); recursive=False lets it still compile the block's forward inside.
@torch.compiler.disable(recursive=False)
def eager_checkpoint(forward: Callable, *args, context_fn: Callable):
    return checkpoint(forward, *args, use_reentrant=False, context_fn=context_fn)


# The dense blocks' checkpointed forwards name their context function in the code: torch.compile takes
# a function it can see (a global), not one held in a closure cell.
def whole_block(forward: Callable) -> Callable:
    def checkpointed_forward(*args):
        return checkpoint(forward, *args, use_reentrant=False)
    return checkpointed_forward


def per_op(forward: Callable) -> Callable:
    def checkpointed_forward(*args):
        return checkpoint(forward, *args, use_reentrant=False, context_fn=per_op_contexts)
    return checkpointed_forward


def moe_block(moe_layers: list[MoEFeedForward], inner: Callable[[], tuple]) -> Callable[[Callable], Callable]:
    contexts = functools.partial(moe_replay_contexts, moe_layers, inner)

    def wrap(forward: Callable) -> Callable:
        def checkpointed_forward(*args):
            return eager_checkpoint(forward, *args, context_fn=contexts)
        return checkpointed_forward
    return wrap


def checkpoint_block(block: nn.Module, selective_per_op: bool) -> None:
    """Make `block`'s forward recompute in the backward (per-op selective or whole), names unchanged."""
    moe_layers = [m for m in block.modules() if isinstance(m, MoEFeedForward)]
    if moe_layers:
        wrap = moe_block(moe_layers, per_op_contexts if selective_per_op else noop_context_fn)
    else:
        wrap = per_op if selective_per_op else whole_block
    block.forward = wrap(block.forward)  # wraps the class's forward, bound to the block


def checkpointed_blocks(layer_names: list[str], mode: str, every: int) -> list[str]:
    """Names (global layer indices) of the blocks to checkpoint."""
    if mode == "none":
        return []
    if mode == "selective" and every > 0:
        return [name for name in layer_names if (int(name) + 1) % every == 0]
    return list(layer_names)


def apply_activation_checkpointing(model: nn.Module, mode: str, every: int) -> None:
    """Checkpoint the blocks of `model` (a GPT or one pipeline stage of it, in `model.layers`) in place:
    mode 'none' | 'full' | 'selective' with `every` (train.ac_every; 0 = per-op on every block)."""
    selective_per_op = mode == "selective" and every == 0
    for name in checkpointed_blocks(list(model.layers.keys()), mode, every):
        checkpoint_block(model.layers[name], selective_per_op)
