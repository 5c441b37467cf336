"""Fused kernels for patch-level training, each with a torch fallback."""

from __future__ import annotations

import os
from typing import Callable

import torch

from patchtrain.kernels.triton_patch_ce import TRITON_AVAILABLE, triton_patch_cross_entropy
from patchtrain.reference_loss import patch_cross_entropy

__all__ = ["TRITON_AVAILABLE", "select_patch_loss", "triton_patch_cross_entropy"]


def select_patch_loss(device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The next-patch loss `(logits [N, V], targets [N, K]) -> 0-d fp32 mean`, chosen once at build time.

    Returns the fused triton kernel when triton is importable and `device` is CUDA: it streams the
    vocabulary with an online logsumexp, so the fp32 copy / log-softmax of the [N, V] logits that the
    torch reference materialises is never allocated, and backward recomputes the softmax from the saved
    per-row lse. Everywhere else (CPU, MPS, no triton) it returns the torch reference
    `patchtrain.reference_loss.patch_cross_entropy`, since compiled triton kernels only run on GPUs. Setting
    PPMOE_FORCE_TRITON=1 picks the triton kernel on any device when triton is installed (tests use it
    on CPU together with TRITON_INTERPRET=1, triton's interpreter). Both have the same semantics.
    """
    force = os.environ.get("PPMOE_FORCE_TRITON", "0") == "1"
    if TRITON_AVAILABLE and (force or torch.device(device).type == "cuda"):
        return triton_patch_cross_entropy
    return patch_cross_entropy
