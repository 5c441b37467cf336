"""Top-k token-choice router with softmax gate, load-balancing and z losses, optional capacity.

Shapes: T tokens (batch * seq flattened), E experts, k choices per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Routing:
    """Where each token goes.

    expert_ids: [T, k] int64, the chosen experts (best first).
    weights:    [T, k] float32, gate weights (softmax probabilities, renormalised over the k if asked);
                differentiable, so the router learns through the combine.
    keep:       [T, k] bool, False where a capacity limit dropped the assignment (all True when dropless).
    aux_loss, z_loss: 0-d float32, coefficients applied.
    tokens_per_expert: [E] int64, kept assignments per expert.
    """

    expert_ids: torch.Tensor
    weights: torch.Tensor
    keep: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    tokens_per_expert: torch.Tensor


def load_balancing_loss(probs: torch.Tensor, expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch Transformer (Fedus et al., 2021, eq. 4) generalised to top-k: E * sum_e f_e * P_e, where f_e
    is the share of the T*k assignments that chose e (no gradient) and P_e the mean gate probability of e.
    Equals 1 for a perfectly uniform router. probs: [T, E], expert_ids: [T, k]."""
    counts = torch.bincount(expert_ids.flatten(), minlength=num_experts).to(probs.dtype)
    f = counts / expert_ids.numel()
    return num_experts * torch.sum(f * probs.mean(dim=0))


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE, Zoph et al., 2022): mean squared log-partition function. logits: [T, E]."""
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


def capacity_mask(expert_ids: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """[T, k] bool: keep an assignment while its expert has room. First choices of all tokens are served
    before second choices, and within one choice rank earlier tokens first (deterministic)."""
    choice_major = expert_ids.t().reshape(-1)  # [k*T]: all first choices, then all second choices...
    one_hot = F.one_hot(choice_major, num_experts)
    position_in_expert = (one_hot.cumsum(dim=0) * one_hot).sum(dim=-1) - 1  # [k*T]
    keep = position_in_expert < capacity
    return keep.view(expert_ids.shape[1], -1).t()


class TopKRouter(nn.Module):
    """Linear gate -> softmax over E -> top-k. Every TP rank holds the same gate and computes the same
    routing (Pipeline-MoE relies on that), so jitter noise, when on, is drawn from a generator seeded by
    `jitter_seed` and a call counter, identical on every rank."""

    def __init__(self, d_model: int, num_experts: int, top_k: int, *, normalize_topk: bool = True,
                 jitter: float = 0.0, capacity_factor: float | None = None, aux_loss_coef: float = 0.01,
                 z_loss_coef: float = 0.001, jitter_seed: int = 0):
        super().__init__()  # 1 <= top_k <= num_experts: a config rule (ppmoe.config)
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        self.num_experts, self.top_k = num_experts, top_k
        self.normalize_topk, self.jitter, self.capacity_factor = normalize_topk, jitter, capacity_factor
        self.aux_loss_coef, self.z_loss_coef = aux_loss_coef, z_loss_coef
        self.jitter_seed, self.jitter_calls = jitter_seed, 0

    def capacity(self, num_tokens: int) -> int:
        """Assignments each expert accepts: ceil(capacity_factor * T * k / E)."""
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)

    def forward(self, x: torch.Tensor) -> Routing:
        """x: [T, d_model] -> Routing for T tokens."""
        if self.training and self.jitter > 0:
            # Multiplicative input jitter (Switch Transformer), the same on every rank.
            g = torch.Generator(device="cpu").manual_seed(self.jitter_seed * 1_000_003 + self.jitter_calls)
            self.jitter_calls += 1
            noise = torch.empty(x.shape, dtype=torch.float32).uniform_(1 - self.jitter, 1 + self.jitter, generator=g)
            x = x * noise.to(x.device, x.dtype)
        # [T, E] in fp32 (Megatron's moe_router_dtype=fp32): under bf16 compute the gate's inputs arrive in
        # bf16, but the products are summed in fp32 and never rounded to bf16, so near-tied experts are told
        # apart as in fp32; softmax, top-k and the aux losses follow in fp32. A no-op under fp32.
        logits = F.linear(x.float(), self.gate.weight.float())
        probs = logits.softmax(dim=-1)
        weights, expert_ids = probs.topk(self.top_k, dim=-1)
        if self.normalize_topk and self.top_k > 1:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.capacity_factor is None:
            keep = torch.ones_like(expert_ids, dtype=torch.bool)
        else:
            keep = capacity_mask(expert_ids, self.num_experts, self.capacity(x.shape[0]))
        kept_ids = expert_ids[keep]
        return Routing(
            expert_ids=expert_ids, weights=weights, keep=keep,
            aux_loss=self.aux_loss_coef * load_balancing_loss(probs, expert_ids, self.num_experts),
            z_loss=self.z_loss_coef * z_loss(logits),
            tokens_per_expert=torch.bincount(kept_ids, minlength=self.num_experts),
        )
