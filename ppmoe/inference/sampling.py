"""Choosing the next token from a position's logits: greedy, or sampled with temperature and top-k."""

from __future__ import annotations

from typing import Callable

import torch

TokenPicker = Callable[[torch.Tensor], int]
"""logits [vocab] -> the chosen token id."""


def token_picker(temperature: float = 1.0, top_k: int | None = None, seed: int = 0,
                 vocab_size: int | None = None) -> TokenPicker:
    """The rule that turns logits [vocab] into a token id, chosen once per generation.

    temperature 0: greedy (argmax, no randomness). Otherwise softmax(logits / temperature) restricted to the
    top_k largest logits (all when None), sampled from a torch.Generator seeded with `seed`: the same seed
    and the same logits give the same tokens. Sampling runs on CPU, so a GPU and a CPU run draw the same
    numbers (a device generator would not), for the cost of copying one row of logits per token.

    vocab_size: only ids below it are ever chosen (the tokenizer's vocabulary: the model's is padded to a
    multiple, and the padding rows' logits, never trained towards, are not tokens); None: all.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None (no limit), got {top_k}")
    if vocab_size is not None and vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1 or None (the whole output), got {vocab_size}")
    if temperature == 0:
        return lambda logits: int(logits[:vocab_size].argmax())
    generator = torch.Generator(device="cpu").manual_seed(seed)

    def sample(logits: torch.Tensor) -> int:
        scaled = logits[:vocab_size].detach().float().cpu() / temperature
        if top_k is None:
            return int(torch.multinomial(scaled.softmax(-1), 1, generator=generator))
        # Sample among the k best only: their renormalised softmax, then map back to vocabulary ids.
        best, ids = scaled.topk(min(top_k, scaled.shape[-1]))
        return int(ids[torch.multinomial(best.softmax(-1), 1, generator=generator)])

    return sample
