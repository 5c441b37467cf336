"""Resolved sizes of an MoE layer (no imports of the model, so both packages can use it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MoEShape:
    """Resolved MoE sizes and router settings (see MoEConfig for their meaning)."""

    num_experts: int
    top_k: int = 1
    every: int = 1
    expert_hidden: int = 0
    shared_expert_hidden: int = 0
    shared_expert_gate: bool = False
    normalize_topk: bool = True
    jitter: float = 0.0
    capacity_factor: float | None = None
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    expert_kernel: str = "padded_bmm"
