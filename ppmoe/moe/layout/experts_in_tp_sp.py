"""Pipeline-MoE under sequence parallelism (`moe.dispatcher: experts_in_tp` with
`parallel.sequence_parallel: true`): the layer takes and returns this TP rank's slice of the sequence,
like every norm and residual add around it.

The same experts, weights and routing as ExpertsInTP (experts_in_tp.py); only the communication moves:
  1. all-gather the sequence slices: every rank holds all T = batch * seq tokens (no all-reduce of the
     input gradient in backward: this all-gather's backward is a reduce-scatter);
  2. every rank routes all T tokens identically (replicated gate, as before) and takes its experts'
     tokens by index slicing;
  3. its part of the output: its experts' gate-weighted outputs plus its slice of the shared expert
     (w1/w3 rows, w2 columns: each rank computes hidden / tp of its units, so the sum over ranks is the
     shared expert's output, and a gated shared expert's gate [T, 1] multiplies each rank's part);
  4. one reduce-scatter sums the parts and leaves each rank its slice of the sequence.

Gradients. Work split over the ranks (experts, the shared expert's units) gets the all-gathered output
gradient and sends its input gradient back through the reduce-scatter (the all-gather's backward).
Work every rank repeats (the router and the shared expert's gate) sees the tokens through
`replicated_from_sequence` (backward: its own slice, no communication); its outputs enter the split
work through one copy_many_to_group, whose backward all-reduces their gradients (T x k gate weights,
plus T gate values with a gated shared expert), so every rank back-propagates the same full gradient
into the router, and the router's weight gradient is the same on every rank with no reduction. The aux
losses, attached to each rank's output slice, back-propagate identically on every rank too.

Bytes per layer, T tokens of d values: forward one all-gather + one reduce-scatter of T x d, backward
one reduce-scatter + one all-gather of T x d and an all-reduce of T x k (+ T) values. An all-gather plus a
reduce-scatter move what one all-reduce of T x d moves, so this is ExpertsInTP's all-reduce per pass
(forward: the output; backward: the T x (d + k) input and gate gradients), with the shared expert folded
into the same two collectives instead of its own all-reduce per pass.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...layers import GatedSwiGLU, SwiGLU
from ..comm import copy_many_to_group, gather_from_sequence, reduce_scatter_to_sequence, replicated_from_sequence
from ..experts import GroupedExperts, local_tensor
from ..router import Routing, TopKRouter
from .experts_in_tp import ExpertsInTP

SEQUENCE_DIM = 1  # of the layer's [batch, seq, d_model] input


def swiglu_part(ffn: SwiGLU, x: torch.Tensor) -> torch.Tensor:
    """This rank's part of a SwiGLU split over the TP group (w1/w3 sharded by rows, w2 by columns: the
    rank's slice of the hidden units): x [T, d] -> [T, d]; summed over the ranks it is the SwiGLU's
    output (without a GatedSwiGLU's gate)."""
    w1, w3, w2 = (local_tensor(linear.weight) for linear in (ffn.w1, ffn.w3, ffn.w2))
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


def shared_gate(shared_expert: nn.Module | None, x: torch.Tensor) -> torch.Tensor | None:
    """A gated shared expert's per-token scale sigmoid(gate x): x [T, d] -> [T, 1]; None without one."""
    if isinstance(shared_expert, GatedSwiGLU):
        return torch.sigmoid(shared_expert.gate(x))
    return None


class SequenceParallelExpertsInTP(ExpertsInTP):
    """ExpertsInTP for layers whose input and output are sequence slices. Its shared expert's w1/w3/w2
    must be split over the TP mesh without DTensor hooks (ppmoe.parallel.sequence_parallel does it): this
    layout computes with the local shards."""

    # Eager under torch.compile as a whole (ppmoe.parallel.compile_blocks): the expert part's shapes depend
    # on the routing, and the router sits between the sequence collectives.
    @torch.compiler.disable
    def layer_forward(self, x: torch.Tensor, router: TopKRouter, experts: GroupedExperts,
                      shared_expert: nn.Module | None) -> tuple[torch.Tensor, Routing]:
        """x: [batch, seq / tp, d_model], this rank's slice of the sequence -> (the same slice of the
        output, the routing of all batch * seq tokens, the same on every rank)."""
        whole = gather_from_sequence(x, self.group, SEQUENCE_DIM)  # [batch, seq, d_model]
        same = replicated_from_sequence(x, whole.detach(), self.group, SEQUENCE_DIM)
        tokens, same_tokens = whole.flatten(0, 1), same.flatten(0, 1)  # [T, d_model]
        routing = router(same_tokens)
        gate = shared_gate(shared_expert, same_tokens)
        # Into the split work: one all-reduce of the gate weights' (and the shared gate's) gradients.
        scales = copy_many_to_group((routing.weights,) if gate is None else (routing.weights, gate), self.group)
        part = self.own_experts(tokens, scales[0], routing, experts)
        if shared_expert is not None:
            shared = swiglu_part(shared_expert, tokens)
            part = part + (shared if gate is None else scales[1] * shared)
        return reduce_scatter_to_sequence(part.view(whole.shape), self.group, SEQUENCE_DIM), routing
