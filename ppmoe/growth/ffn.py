"""FFN hidden growth h -> t*h by tiling hidden units (growth.ops.ffn='tile'): dense FFNs, every expert,
shared experts.

SwiGLU is elementwise over hidden units: y = W2 (silu(W1 x) * W3 x) = sum_u W2[:, u] a_u(x). Copying
the rows of W1 and W3 t times makes each copy of unit u compute the same a_u(x); giving each copy
W2[:, u] / t sums back to y. Exact for any integer t (to fp32 rounding of the longer sum).

Gradients (the optimizer-moment transform): a copy of unit u is read through W2/t, so W1's and W3's
gradients are 1/t of the old ones; W2's gradient is the output gradient times the unchanged activation,
the old one. The copies of W2's columns are what symmetry-breaking noise perturbs (copy axis).
"""

from __future__ import annotations

from .recipe import Recipe, Tile, noted, reading_copies, scaled, with_steps

HIDDEN_AXES = {
    # name inside a layer: (hidden axis, whether that axis is the tensor's input)
    "feed_forward.w1.weight": (0, False),                # [f, d]
    "feed_forward.w3.weight": (0, False),                # [f, d]
    "feed_forward.w2.weight": (1, True),                 # [d, f]
    "feed_forward.shared_expert.w1.weight": (0, False),  # [s, d]
    "feed_forward.shared_expert.w3.weight": (0, False),  # [s, d]
    "feed_forward.shared_expert.w2.weight": (1, True),   # [d, s]
    "feed_forward.experts.w1": (2, False),               # [E, d, h]
    "feed_forward.experts.w3": (2, False),               # [E, d, h]
    "feed_forward.experts.w2": (1, True),                # [E, h, d]
}
# FFN tensors with no hidden axis: tiling the hidden units leaves them as they are.
NO_HIDDEN_AXIS = frozenset({"feed_forward.shared_expert.gate.weight"})  # [1, d]: the shared expert's gate


def hidden_ratio(old_size: int, new_size: int, what: str) -> int:
    """t = new/old for a hidden size named `what` (a config field); ValueError unless a positive integer."""
    if old_size <= 0 or new_size < old_size or new_size % old_size:
        raise ValueError(f"{what} {old_size} -> {new_size}: FFN growth tiles hidden units and needs an "
                         f"integer ratio >= 1")
    return new_size // old_size


def tile_hidden(recipe: Recipe, name: str, times: int) -> Recipe:
    """Tile the hidden axis of FFN tensor `name` (in its grown layout) `times` times; identity for 1."""
    if times == 1 or name in NO_HIDDEN_AXIS:
        return recipe
    axis, is_input = HIDDEN_AXES[name]
    recipe = noted(with_steps(recipe, Tile(axis, times)), f"ffn tile x{times}")
    if is_input:
        return reading_copies(scaled(recipe, 1.0 / times, 1.0), axis, times)
    return scaled(recipe, 1.0, 1.0 / times)
