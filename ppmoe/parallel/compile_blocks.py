"""torch.compile per transformer block (`train.compile`), applied from outside after activation
checkpointing and before data parallelism (torchtitan's order TP -> AC -> compile -> FSDP).

Each block's forward (the checkpointed one when activation checkpointing is on) is replaced by its
compiled version, an instance attribute like activation checkpointing's: the module tree, parameter names
and checkpoint keys are unchanged, and FSDP2's hooks on the block's __call__ stay outside the compiled
code. Compiling block by block keeps compile time that of one block (all blocks of a kind share the code)
and lets TP's DTensors and the pipeline stages through unchanged.

Graph breaks (dynamo stops the graph, runs the piece eagerly and compiles what follows; no error): all in
the MoE layer, where shapes depend on the routing:
- the router's jitter noise (ppmoe.moe.router: a torch.Generator seeded by a Python call counter);
- ppmoe.moe.permute.sort_by_expert: `nonzero()` (as many assignments as the capacity kept) and
  `bincount(...).tolist()` (tokens per expert as Python ints, the split sizes of every expert kernel);
- the expert kernels of ppmoe.moe.experts (`x.split(counts)`, `torch.tensor(counts)`) and the alltoall
  layout's `.tolist()` of the exchanged counts, which depend on those ints;
- the MoE dispatchers' collectives (ppmoe.moe.comm: autograd Functions around in-place c10d calls).
Dense blocks (attention, SwiGLU, norms, DTensor's TP collectives) compile into one graph. A checkpointed
MoE block's body cannot be traced as one checkpoint region (it breaks), so the checkpoint runs eagerly
and dynamo compiles the pieces inside it.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def apply_compile(model: nn.Module, enabled: bool) -> None:
    """Compile the forward of every block of `model` (a GPT or one pipeline stage, `model.layers`) in
    place when `enabled`."""
    if not enabled:
        return
    for block in model.layers.values():
        block.forward = torch.compile(block.forward)
