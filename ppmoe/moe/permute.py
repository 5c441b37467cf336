"""Token permutation: group a rank's (token, choice) assignments by expert, and scatter results back."""

from __future__ import annotations

import torch


def sort_by_expert(expert_ids: torch.Tensor, keep: torch.Tensor, first: int, last: int
                   ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Select the kept assignments to experts first..last-1 and order them by expert.

    expert_ids, keep: [T, k]. Returns
      token_index [N]: the token of each selected assignment (rows of x to gather, `x[token_index]`),
      slot [N]: its flat index into the [T, k] routing tensors (to pick its gate weight),
      counts: N_e per expert of the range (python ints, sum N).
    Stable: within an expert, assignments keep token order.
    """
    k = expert_ids.shape[1]
    flat = expert_ids.flatten()
    selected = keep.flatten() & (flat >= first) & (flat < last)
    slot = selected.nonzero().squeeze(1)
    local_expert = flat[slot] - first
    order = torch.argsort(local_expert, stable=True)
    slot = slot[order]
    counts = torch.bincount(local_expert, minlength=last - first).tolist()
    return slot // k, slot, counts


def combine(expert_out: torch.Tensor, token_index: torch.Tensor, gate: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Weighted scatter-add of expert outputs [N, d] back to tokens: out[token_index[i]] += gate[i] * y[i].
    Returns [num_tokens, d]; tokens with no selected assignment stay zero."""
    out = expert_out.new_zeros(num_tokens, expert_out.shape[-1])
    return out.index_add(0, token_index, expert_out * gate.to(expert_out.dtype)[:, None])
