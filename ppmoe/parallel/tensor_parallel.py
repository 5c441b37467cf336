"""Megatron-style tensor parallelism for the GPT, applied from outside with DTensor.

Per block: q/k/v and w1/w3 are column-parallel (each rank owns whole heads / a slice of the FFN),
wo and w2 are row-parallel (partial sums all-reduced). Attention's and the dense FFN's input becomes one
replicated DTensor at the module's entry, so the column-parallel layers' partial input gradients add up
before one all-reduce per module in backward (Megatron's f), not one per layer (q, k, v: three). The
embedding is vocab-parallel (row-sharded table, masked lookup, all-reduce) and the output projection
column-parallel over the vocabulary; its logits stay sharded ([batch, seq, vocab/tp]) and the loss is
computed under `loss_parallel()`, so the full vocabulary is never gathered. Norm weights stay replicated
plain tensors: their inputs are replicated and their gradients arrive already summed over the TP group.
Sequence parallelism on top of this is sequence_parallel.py.
"""

from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel, parallelize_module

from ..model.gpt import GPT
from ..moe import MoEFeedForward


def swiglu_plan(prefix: str) -> dict:
    return {f"{prefix}.w1": ColwiseParallel(), f"{prefix}.w3": ColwiseParallel(), f"{prefix}.w2": RowwiseParallel()}


def block_plan(ffn) -> dict:
    plan = {
        "attention": PrepareModuleInput(input_layouts=(Replicate(), None, None),
                                        desired_input_layouts=(Replicate(), None, None)),
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(),
    }
    if not isinstance(ffn, MoEFeedForward):
        plan["feed_forward"] = PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Replicate(),))
        plan.update(swiglu_plan("feed_forward"))
    elif ffn.shared_expert is not None:
        plan.update(swiglu_plan("feed_forward.shared_expert"))
    return plan


def apply_tensor_parallel(model: GPT, tp_mesh: DeviceMesh) -> None:
    """Shard `model` in place over `tp_mesh` (a 1D mesh). Every rank must hold the same full weights
    before the call (build_model with the same seed); each keeps its own slice. The experts of MoE
    layers are laid out separately (expert_parallel.py); their shared expert is split like a dense FFN."""
    if tp_mesh.size() == 1:
        return
    tied = model.shape.tie_embeddings
    plan = {}
    if model.tok_embeddings is not None:
        plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate())
    if model.output is not None:
        plan["output"] = ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)
    parallelize_module(model, tp_mesh, plan)
    for layer in model.layers.values():
        parallelize_module(layer, tp_mesh, block_plan(layer.feed_forward))
    if tied and model.tok_embeddings is not None and model.output is not None:
        # Both tables are sharded along the vocabulary (dim 0), so one DTensor serves both.
        model.output.weight = model.tok_embeddings.weight
