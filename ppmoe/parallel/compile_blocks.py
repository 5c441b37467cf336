"""torch.compile per transformer block (`train.compile`), applied from outside after activation
checkpointing and before data parallelism (torchtitan's order TP -> AC -> compile -> FSDP).

Each block's forward (the checkpointed one when activation checkpointing is on) is replaced by its
compiled version, an instance attribute like activation checkpointing's: the module tree, parameter names
and checkpoint keys are unchanged, and FSDP2's hooks on the block's __call__ stay outside the compiled
code. Compiling block by block keeps compile time that of one block (blocks of a kind share the code).

The first block after the embedding gets a copy of its input (`on_a_copy`): under TP the embedding's output
is a view made by DTensor's to_local, and the compiled backward otherwise fails (seen on torch 2.13); the
copy is done whatever the layout, so the code does not depend on it. Tested: one process, tp2 with
Pipeline-MoE (and per-op checkpointing), tp2 with sequence parallelism, FSDP2 over two ranks, 1F1B over
two stages, each with dense and MoE blocks.

Where the graph breaks (dynamo ends the graph there, runs that piece eagerly and compiles what follows;
no error), all in the MoE block, where shapes depend on the routing:
- ppmoe.moe.layout.base.dispatch_to_experts is torch.compiler.disable'd, on purpose: from there on everything
  is data-dependent: `nonzero()` and `bincount(...).tolist()` in ppmoe.moe.permute.sort_by_expert (tokens
  per expert as Python ints), the kernels' `x.split(counts)` / `torch.tensor(counts)` / `offs=` of
  ppmoe.moe.experts, the alltoall layout's `.tolist()` of the exchanged counts and its split sizes, and
  the dispatchers' collectives (ppmoe.moe.comm). Traced, each new set of counts would recompile; and fp32
  torch._grouped_mm has no fake-tensor kernel (its meta function wants bf16). Under sequence
  parallelism the Pipeline-MoE layer's whole token path (SequenceParallelExpertsInTP.layer_forward: the
  gather, the router, the experts, the reduce-scatter) runs eagerly for the same reason.
- the router's jitter (ppmoe.moe.router): `torch.Generator().manual_seed(...)` cannot be traced.
- an activation-checkpointed MoE block: its checkpoint call runs eagerly (its replay contexts are Python
  side effects; ppmoe.parallel.activation_checkpointing.eager_checkpoint) and the forward inside compiles.
Dense blocks (attention, SwiGLU, norms; their per-op checkpoint policy too) compile into one graph.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn


def on_a_copy(forward: Callable) -> Callable:
    """`forward` given a copy of its input x: [batch, seq, d_model] rather than x itself. For the block after
    the embedding: under TP the embedding's output is a view that DTensor's to_local made, and AOT autograd
    sends the gradient of a view input to its base, here a DTensor, as a plain tensor (the backward fails
    in DTensor's redistribute). One activation copy per step."""
    def forward_on_copy(x: torch.Tensor, *args):
        return forward(x.clone(), *args)
    return forward_on_copy


def apply_compile(model: nn.Module, enabled: bool) -> None:
    """Compile the forward of every block of `model` (a GPT or one pipeline stage, `model.layers`) in
    place when `enabled`."""
    if not enabled:
        return
    for index, block in enumerate(model.layers.values()):
        block.forward = torch.compile(block.forward)
        if index == 0 and model.tok_embeddings is not None:
            block.forward = on_a_copy(block.forward)
