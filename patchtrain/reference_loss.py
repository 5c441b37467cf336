"""The torch reference next-patch cross-entropy: the semantics every faster form must match.

It lives alone, below both loss.py (which builds the loss for a layout) and kernels/ (whose selector
falls back to it), so that each of them imports it from the top of its file without importing the other.
"""

from __future__ import annotations

import torch

__all__ = ["patch_cross_entropy", "expanded_cross_entropy"]


def patch_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits [N, V] (any float dtype; computed in fp32), targets [N, K] int64 -> mean loss (0-d fp32).

    One logsumexp per row, shared by the K targets."""
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)  # [N]
    picked = logits.gather(-1, targets)  # [N, K]
    return (lse[:, None] - picked).mean()


def expanded_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The same loss through F.cross_entropy on K views of each row (a second reference; K expanded rows
    inside the kernel). logits [N, V], targets [N, K]."""
    n, k = targets.shape
    expanded = logits.unsqueeze(1).expand(n, k, logits.shape[-1]).reshape(n * k, -1)
    return torch.nn.functional.cross_entropy(expanded.float(), targets.reshape(-1))
