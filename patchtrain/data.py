"""Batches for the patch phase: T patches of K tokens per sequence, and the K tokens each patch predicts.

A patch-phase sample is a window of K*T + K tokens: the first K*T are the input patches, and patch i's
targets are tokens (i+1)K .. (i+1)K + K - 1. The token loader's windows are seq_len + 1 tokens with
targets shifted by one, so the patch phase reuses it with seq_len = K*T + K - 1 and reshapes.
"""

from __future__ import annotations

import torch


def patch_window_len(seq_len: int, patch_size: int) -> int:
    """The loader's seq_len for the patch phase (its windows are one token longer)."""
    return patch_size * seq_len + patch_size - 1


def to_patch_batch(inputs: torch.Tensor, targets: torch.Tensor, seq_len: int, patch_size: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Loader output (inputs, targets: [B, K*T + K - 1], targets = inputs shifted by one) ->
    (tokens [B, K*T], next-patch targets [B, T, K])."""
    k, t = patch_size, seq_len
    return inputs[:, : k * t], targets[:, k - 1 : k - 1 + k * t].reshape(-1, t, k)
