"""Which cached positions the new queries may attend to."""

from __future__ import annotations

import torch


def prefix_causal_mask(start: int, new: int, device: torch.device) -> torch.Tensor | None:
    """The attention mask of `new` queries at positions start..start+new-1 over the keys 0..start+new-1:
    [new, start+new] bool, True where query i may see key j, that is j <= start + i (the whole prefix
    and the new tokens up to itself). None when every query may see every key (one new token).

    SDPA's is_causal aligns the triangle to the top-left corner (query i sees keys 0..i), which is right
    only for an empty prefix; after a prefix the triangle must be shifted by `start`, hence this mask.
    """
    if new == 1:
        return None
    keys = torch.arange(start + new, device=device)
    queries = torch.arange(start, start + new, device=device)
    return keys[None, :] <= queries[:, None]
