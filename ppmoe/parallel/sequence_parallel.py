"""Sequence parallelism (Megatron-LM's, Korthikanti et al. 2022) on top of tensor parallelism:
`parallel.sequence_parallel: true`.

Tensor parallelism alone keeps the residual stream, the norms and their activations whole on every TP
rank. Here they hold each rank's slice of the sequence ([batch, seq / tp, d_model], a plain local
tensor between modules, so pipeline stages pass slices too):
- the embedding (vocabulary-parallel) reduce-scatters its partial lookups to sequence slices instead
  of all-reducing them;
- the norms run on the slices (torch's SequenceParallel: weights replicated DTensors; their gradients,
  partial sums over the TP group, are summed by `sum_partial_gradients` once the weights have storage);
- attention and the dense FFN all-gather the sequence at their input (one all-gather per module, whose
  backward is one reduce-scatter), and their row-parallel wo / w2 reduce-scatter to slices instead of
  all-reducing;
- an MoE layer's experts_in_tp layout becomes SequenceParallelExpertsInTP (ppmoe.moe.layout): all-gather
  in, route every token identically, its experts by index slicing, one reduce-scatter out; its shared
  expert's weights are split like a dense FFN's but computed inside that gather/scatter pair;
- the final norm runs on slices, and the output projection all-gathers the sequence and keeps its
  vocabulary-sharded logits for the vocab-parallel loss (unchanged: it sees [batch, seq, vocab / tp]).
Attention takes its rotary rows from the gathered length (ppmoe.layers.Attention), so GPT.forward does
not know which layout runs it.

Bytes: per module an all-gather + a reduce-scatter of [batch, seq, d_model] in each pass, which is what
the one all-reduce of tensor parallelism moves (a ring all-reduce is a reduce-scatter then an
all-gather); activation memory outside attention and the FFN drops to 1/tp. With tp = 1 this is plain
tensor parallelism, i.e. nothing.
"""

from __future__ import annotations

from typing import Callable

import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                               SequenceParallel, parallelize_module)

from ..model.gpt import GPT
from ..moe import MoEFeedForward
from ..moe.layout import ExpertsInTP, SequenceParallelExpertsInTP
from .tensor_parallel import apply_tensor_parallel

SEQUENCE = Shard(1)  # of [batch, seq, d_model]


def sum_partial_gradient(grad: DTensor) -> DTensor:
    """A replicated weight's gradient from sequence slices is a partial sum over the TP ranks: sum it."""
    if any(placement.is_partial() for placement in grad.placements):
        return grad.redistribute(placements=[Replicate()] * len(grad.placements))
    return grad


def sum_partial_gradients(model: nn.Module) -> None:
    """Hook every replicated DTensor parameter of `model` (under SP: the norm weights, which see sequence
    slices) so that its gradient, which DTensor leaves a partial sum over the TP ranks, is summed in every
    backward: d_model values per norm per micro-batch. Nothing else would sum it without data parallelism
    (tp, tp x pp); FSDP / replicate reduce their own unsharded copies (their sharded parameters get
    `.grad` assigned, so these hooks never fire there). Call after materialising: a hook on a meta
    Parameter does not survive it. Without SP there are no such parameters and this does nothing."""
    for param in model.parameters():
        if isinstance(param, DTensor) and all(placement.is_replicate() for placement in param.placements):
            param.register_hook(sum_partial_gradient)


def attention_plan() -> dict:
    return {
        "attention_norm": SequenceParallel(),
        # One all-gather for q, k and v together (the input stays a DTensor, so their three partial input
        # gradients add up before the one reduce-scatter of its backward). cos, sin pass as they are.
        "attention": PrepareModuleInput(input_layouts=(SEQUENCE, None, None),
                                        desired_input_layouts=(Replicate(), None, None)),
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=SEQUENCE),
    }


def dense_ffn_plan() -> dict:
    return {
        "ffn_norm": SequenceParallel(),
        "feed_forward": PrepareModuleInput(input_layouts=(SEQUENCE,), desired_input_layouts=(Replicate(),)),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w3": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(output_layouts=SEQUENCE),
    }


def split_shared_expert(shared: nn.Module, tp_mesh: DeviceMesh) -> None:
    """The shared expert's w1/w3 sharded by rows and w2 by columns (the placements ColwiseParallel and
    RowwiseParallel give, so checkpoints are the same), but without their input/output hooks:
    SequenceParallelExpertsInTP computes its part from the local shards. A gate stays replicated."""
    for name, placement in (("w1", Shard(0)), ("w3", Shard(0)), ("w2", Shard(1))):
        linear = getattr(shared, name)
        linear.weight = nn.Parameter(distribute_tensor(linear.weight.data, tp_mesh, [placement]))


def sequence_parallel_moe(moe: MoEFeedForward, tp_mesh: DeviceMesh) -> None:
    """Give an MoE layer its sequence-parallel layout (all-gather in, reduce-scatter out)."""
    if not isinstance(moe.layout, ExpertsInTP):
        # Config rules refuse this before training (ppmoe.config.validate); here for code that builds its own.
        raise ValueError(f"moe.dispatcher={moe.layout.name!r} has no sequence-parallel form; use experts_in_tp")
    moe.layout = SequenceParallelExpertsInTP(moe.layout.mesh, moe.layout.num_experts)
    if moe.shared_expert is not None:
        split_shared_expert(moe.shared_expert, tp_mesh)


def apply_sequence_parallel(model: GPT, tp_mesh: DeviceMesh) -> None:
    """Tensor + sequence parallelism on `model` (the whole GPT or a pipeline stage of it) in place, over the
    1-D `tp_mesh`, on the meta device (placements only; ppmoe.model.build.materialize then gives each rank
    its shards, initialised as one process's model) or with every rank holding the same full weights.
    The routed experts are placed afterwards by their layout (ppmoe.parallel.apply_expert_layout)."""
    if tp_mesh.size() == 1:
        return
    plan = {}
    if model.tok_embeddings is not None:
        plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=SEQUENCE)
    if model.norm is not None:
        plan["norm"] = SequenceParallel()
    if model.output is not None:
        plan["output"] = ColwiseParallel(input_layouts=SEQUENCE, output_layouts=Shard(-1), use_local_output=False)
    parallelize_module(model, tp_mesh, plan)
    for layer in model.layers.values():
        plan = attention_plan()
        if isinstance(layer.feed_forward, MoEFeedForward):
            # The MoE layer takes its slice as a plain tensor; its layout does the gathering.
            plan["ffn_norm"] = SequenceParallel(use_local_output=True)
            sequence_parallel_moe(layer.feed_forward, tp_mesh)
        else:
            plan.update(dense_ffn_plan())
        parallelize_module(layer, tp_mesh, plan)
    if model.shape.tie_embeddings and model.tok_embeddings is not None and model.output is not None:
        # Both tables are sharded along the vocabulary (dim 0), so one DTensor serves both.
        model.output.weight = model.tok_embeddings.weight


def tensor_parallel_step(sequence_parallel: bool) -> Callable[[GPT, DeviceMesh], None]:
    """The tensor-parallel step of parallelising a model (ppmoe.train.parallelize): with or without
    sequence parallelism, chosen once from `parallel.sequence_parallel`."""
    return apply_sequence_parallel if sequence_parallel else apply_tensor_parallel
