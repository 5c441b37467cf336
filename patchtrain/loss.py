"""Next-patch loss (Shao et al., 2024): the output at patch i is one distribution over the vocabulary,
scored against all K tokens of patch i+1 with ONE shared log-softmax:

    L = -(1/K) * sum_k log p(x_{(i+1)K+k} | patches <= i),   averaged over positions.

Equivalently log-sum-exp minus the mean of the K target logits. The torch reference
(reference_loss.py) materialises nothing bigger than the logits; the fused triton kernel
(patchtrain/kernels) avoids even the log-softmax's temporary on GPU.
"""

from __future__ import annotations

import contextlib

import torch

from ppmoe.model.loss import LossFunction, build_loss

from .kernels import select_patch_loss
from .reference_loss import expanded_cross_entropy, patch_cross_entropy
from .vocab_parallel import vocab_parallel_patch_cross_entropy

# The references are re-exported: `patchtrain.loss` is where callers have always found them.
__all__ = ["build_patch_loss", "patch_cross_entropy", "expanded_cross_entropy"]


def build_patch_loss(tp: int, patch_size: int, device: torch.device):
    """The next-patch LossFunction for a layout (chosen once, at build time):
    K = 1 -> ordinary next-token cross-entropy (exactly the token trainer's);
    tensor parallel -> the vocabulary-parallel form (vocab_parallel.py: sharded logits, 3 all-reduces of N);
    otherwise -> the fused triton kernel on GPU, the torch reference elsewhere.
    compute(logits [B, T, V], targets [B, T, K])."""
    if patch_size == 1:
        token = build_loss(tp)
        return LossFunction(lambda logits, targets: token.compute(logits, targets[..., 0]), token.context)
    kernel = vocab_parallel_patch_cross_entropy if tp > 1 else select_patch_loss(device)
    return LossFunction(lambda logits, targets: kernel(logits.flatten(0, 1), targets.reshape(-1, patch_size)),
                        contextlib.nullcontext)

