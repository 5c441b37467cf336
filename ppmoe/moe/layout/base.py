"""What an expert layout is: where a rank's experts live and how routed tokens reach them and come back.

One object per layout (local.py, experts_in_tp.py, alltoall.py), chosen once from the config and the mesh
(`build_expert_layout`), handed to every MoE layer when the model is built, and owning all that differs
between layouts:
- `distribute(experts)`: the expert weights' placement (called once, after tensor parallelism and before
  data parallelism, on the meta device: the weights get storage after every placement is known);
- `prepare_gradients(experts)`: any gradient handling (hooks), once the weights have storage (hooks set
  on a meta Parameter would not survive its materialisation);
- `__call__(x, routing, experts)`: dispatch, expert compute and combine for one layer's tokens;
- `layer_forward(x, router, experts, shared_expert)`: the MoE layer's whole token path (route, the
  layout's call, the shared expert), which a layout may reshape around its communication (the
  sequence-parallel Pipeline-MoE gathers the sequence before routing: experts_in_tp_sp.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor

from ..experts import GroupedExperts
from ..router import Routing, TopKRouter

EXPERT_WEIGHTS = ("w1", "w3", "w2")


class ExpertLayout:
    """Base: a layout is shared by all MoE layers of a model and holds no per-layer state."""

    name = ""

    def distribute(self, experts: GroupedExperts) -> list[nn.Parameter]:
        """Place `experts`' weights for this layout. Returns the parameters data parallelism must leave
        alone (each data-parallel rank owns different ones); none by default."""
        return []

    def prepare_gradients(self, experts: GroupedExperts) -> None:
        """Set up the experts' gradient handling, after their weights got storage; nothing by default."""

    def __call__(self, x: torch.Tensor, routing: Routing, experts: GroupedExperts) -> torch.Tensor:
        """x: [T, d_model] this rank's tokens -> [T, d_model] = sum over kept choices of gate * expert(x)."""
        raise NotImplementedError

    def layer_forward(self, x: torch.Tensor, router: TopKRouter, experts: GroupedExperts,
                      shared_expert: nn.Module | None) -> tuple[torch.Tensor, Routing]:
        """One MoE layer's tokens: x [batch, seq, d_model] -> (y [batch, seq, d_model], the routing of its
        batch * seq tokens) = the routed experts' mix plus the shared expert's output (if any)."""
        flat = x.reshape(-1, x.shape[-1])
        routing = router(flat)
        y = dispatch_to_experts(self, flat, routing, experts)
        if shared_expert is not None:
            y = y + shared_expert(flat)
        return y.view(x.shape), routing

    def __deepcopy__(self, memo: dict) -> ExpertLayout:
        # Shared, and holds process groups: a pipeline stage's copy of the model keeps the same object.
        return self


@torch.compiler.disable
def dispatch_to_experts(layout: ExpertLayout, x: torch.Tensor, routing: Routing, experts: GroupedExperts
                        ) -> torch.Tensor:
    """`layout(x, routing, experts)`, run eagerly under torch.compile: from here on shapes depend on the
    routing's data (nonzero, tokens per expert as Python ints, all-to-all split sizes), which would break
    the graph and recompile for every new set of counts; fp32 torch._grouped_mm has no fake-tensor kernel
    either. The block's other ops (attention, norms, router, shared expert) stay compiled."""
    return layout(x, routing, experts)


def shard_experts(experts: GroupedExperts, mesh: DeviceMesh) -> list[nn.Parameter]:
    """Replace w1/w3/w2 [E, ...] by DTensors sharded on dim 0 (whole experts per rank) over the 1-D
    `mesh` (on the meta device, or with every rank holding the same full weights). Returns the new parameters.
    Checkpoints then hold each expert once and load at any layout."""
    params = []
    for name in EXPERT_WEIGHTS:
        param = nn.Parameter(distribute_tensor(getattr(experts, name).data, mesh, [Shard(0)]))
        setattr(experts, name, param)
        params.append(param)
    return params
