"""Next-patch loss (Shao et al., 2024): the output at patch i is one distribution over the vocabulary,
scored against all K tokens of patch i+1 with ONE shared log-softmax:

    L = -(1/K) * sum_k log p(x_{(i+1)K+k} | patches <= i),   averaged over positions.

Equivalently log-sum-exp minus the mean of the K target logits. The reference here materialises
nothing bigger than the logits; the fused triton kernel (patchtrain/kernels) avoids even the
log-softmax's temporary on GPU.
"""

from __future__ import annotations

import contextlib

import torch

from ppmoe.model.loss import LossFunction, build_loss

from .vocab_parallel import vocab_parallel_patch_cross_entropy


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


def build_patch_loss(tp: int, patch_size: int, device: torch.device):
    """The next-patch LossFunction for a layout (chosen once, at build time):
    K = 1 -> ordinary next-token cross-entropy (exactly the token trainer's);
    tensor parallel -> the vocabulary-parallel form (vocab_parallel.py: sharded logits, 3 all-reduces of N);
    otherwise -> the fused triton kernel on GPU, the torch reference elsewhere.
    compute(logits [B, T, V], targets [B, T, K])."""
    if patch_size == 1:
        token = build_loss(tp)
        return LossFunction(lambda logits, targets: token.compute(logits, targets[..., 0]), token.context)
    kernel = vocab_parallel_patch_cross_entropy if tp > 1 else select_kernel(device)
    return LossFunction(lambda logits, targets: kernel(logits.flatten(0, 1), targets.reshape(-1, patch_size)),
                        contextlib.nullcontext)


def select_kernel(device: torch.device):
    try:
        from .kernels import select_patch_loss
    except ImportError:  # the kernels package is optional
        return patch_cross_entropy
    return select_patch_loss(device)
