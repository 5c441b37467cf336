"""torch.compile per transformer block (`train.compile`), applied from outside after activation
checkpointing and before data parallelism (torchtitan's order TP -> AC -> compile -> FSDP).

Each block's forward (the checkpointed one when activation checkpointing is on) is replaced by its
compiled version, an instance attribute like activation checkpointing's: the module tree, parameter names
and checkpoint keys are unchanged, and FSDP2's hooks on the block's __call__ stay outside the compiled
code. Compiling block by block keeps compile time that of one block (blocks of a kind share the code).

Not with tensor parallelism yet: on torch 2.13 the compiled backward of a TP block (DTensor) fails (AOT
autograd hands an eager DTensor redistribute a plain gradient, with the inductor and aot_eager backends
alike), so ppmoe.config.validate refuses train.compile with parallel.tp > 1. Tested: one process, and
FSDP2 over two gloo ranks, each with a dense and an MoE block.

Where the graph breaks (dynamo ends the graph there, runs that piece eagerly and compiles what follows;
no error), all in the MoE block, where shapes depend on the routing:
- ppmoe.moe.layer.dispatch_to_experts is torch.compiler.disable'd, on purpose: from there on everything
  is data-dependent: `nonzero()` and `bincount(...).tolist()` in ppmoe.moe.permute.sort_by_expert (tokens
  per expert as Python ints), the kernels' `x.split(counts)` / `torch.tensor(counts)` / `offs=` of
  ppmoe.moe.experts, the alltoall layout's `.tolist()` of the exchanged counts and its split sizes, and
  the dispatchers' collectives (ppmoe.moe.comm). Traced, each new set of counts would recompile; and fp32
  torch._grouped_mm has no fake-tensor kernel (its meta function wants bf16).
- the router's jitter (ppmoe.moe.router): `torch.Generator().manual_seed(...)` cannot be traced.
- an activation-checkpointed MoE block: its checkpoint call runs eagerly (its replay contexts are Python
  side effects; ppmoe.parallel.activation_checkpointing.eager_checkpoint) and the forward inside compiles.
Dense blocks (attention, SwiGLU, norms; their per-op checkpoint policy too) compile into one graph.
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
