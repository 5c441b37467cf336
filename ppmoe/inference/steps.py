"""The two ways a generation step computes the next logits: with a KV cache, or over the whole sequence.

A step takes the tokens added since the previous step, [1, s] (the prompt first, then one token at a
time), and returns the logits of the last position, [vocab]. `generate` picks one at the start, so the
per-token loop is the same for both.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..model import GPT
from .forward import forward_with_cache
from .kv_cache import KVCache

Step = Callable[[torch.Tensor], torch.Tensor]


def cached_step(model: GPT, max_len: int) -> Step:
    """Each step runs only the new positions, with the keys/values of the earlier ones from a KV cache
    of `max_len` positions (the prompt plus the new tokens: no more memory than the generation needs)."""
    cache = KVCache.for_model(model, batch=1, max_len=max_len)
    return lambda new: forward_with_cache(model, new, cache)[0, -1]


def full_step(model: GPT) -> Step:
    """Each step runs model(every token so far): the reference, quadratic in the length."""
    seen: list[torch.Tensor] = []

    def step(new: torch.Tensor) -> torch.Tensor:
        seen.append(new)
        return model(torch.cat(seen, dim=1))[0, -1]

    return step
