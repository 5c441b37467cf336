"""Patch input: the embedding of patch i is the mean of its K token embeddings,
E(p_i) = (1/K) sum_k E(x_{iK+k}). No new parameters: a forward hook on the model's token embedding
turns [batch, K*T, d] into [batch, T, d], so the layers (and rotary positions) see T patch positions.
Applied from outside and removed at the switch to token level; parameter names do not change."""

from __future__ import annotations

import torch
import torch.nn as nn


def mean_pool_patches(embeddings: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[batch, K*T, d] -> [batch, T, d]: the mean of each run of K consecutive embeddings."""
    b, s, d = embeddings.shape
    if s % patch_size:
        raise ValueError(f"sequence of {s} tokens is not a whole number of patches of {patch_size}")
    return embeddings.view(b, s // patch_size, patch_size, d).mean(dim=2)


def enable_patch_input(model: nn.Module, patch_size: int):
    """Make `model` (a GPT, or a pipeline stage of one) read patches. Returns a handle whose .remove()
    restores token input, or None when this part of the model has no embedding (a later pipeline stage)."""
    embedding = getattr(model, "tok_embeddings", None)
    if embedding is None:
        return None
    return embedding.register_forward_hook(lambda module, inputs, output: mean_pool_patches(output, patch_size))
