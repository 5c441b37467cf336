"""Depth growth L -> L': which old layer each new layer copies (growth.ops.depth).

- 'stack' (CompoundGrow, G_stack): new layer i copies old layer i mod L, any L' >= L. NOT exact: every
  copied block adds its update to the residual stream a second time.
- 'interpose': new layer i copies old layer i // g, g = L'/L an integer. NOT exact, for the same reason.
- 'identity': interpose's order, and the added copies (i % g != 0) get zeroed output projections
  (`attention.wo.weight` and the FFN's w2: dense, every expert's and the shared expert's). Such a block
  computes x + 0 + 0 = x: exact, and bit-exact when no other operator applies (a product with a zero
  matrix is exactly 0 for finite inputs, and x + 0 == x). Its other weights are copied, so the block
  starts learning from a sensible point once its projections move off zero.
L' == L maps layer i to layer i whatever the mode.

The layer's type (dense or MoE) follows the new shape; a dense source under an MoE slot is upcycled and
an MoE source under a dense slot is refused (ppmoe.growth.growth_map decides, per layer).
"""

from __future__ import annotations

from ..config.growth_rules import source_layer
from .recipe import Recipe, inexact, noted, scaled

DEPTH_MODES = ("stack", "interpose", "identity")

OUTPUT_PROJECTIONS = frozenset({
    "attention.wo.weight",
    "feed_forward.w2.weight",
    "feed_forward.experts.w2",
    "feed_forward.shared_expert.w2.weight",
})
"""A block's writes into the residual stream (names inside a layer): zeroing them all makes it x -> x."""


def check_depth(old_layers: int, new_layers: int, mode: str) -> None:
    """Raise ValueError when `mode` cannot map L layers onto L'."""
    if mode not in DEPTH_MODES:
        raise ValueError(f"growth.ops.depth={mode!r}; choose one of {', '.join(DEPTH_MODES)}")
    if new_layers < old_layers:
        raise ValueError(f"model.n_layers cannot shrink at a growth ({old_layers} -> {new_layers})")
    if new_layers != old_layers and mode != "stack" and new_layers % old_layers:
        raise ValueError(f"model.n_layers {old_layers} -> {new_layers}: depth {mode!r} needs an integer ratio "
                         f"(use 'stack' for any L' >= L)")


def is_added_copy(index: int, old_layers: int, new_layers: int, mode: str) -> bool:
    """Whether new layer `index` is a second (or later) copy of its source layer."""
    if new_layers == old_layers:
        return False
    if mode == "stack":
        return index >= old_layers
    return index % (new_layers // old_layers) != 0


def grow_depth(recipe: Recipe, index: int, name: str, old_layers: int, new_layers: int, mode: str) -> Recipe:
    """Depth's part of the recipe of `layers.{index}.{name}`: a note, zeroing (identity) or a warning."""
    if new_layers == old_layers:
        return recipe
    source = source_layer(index, old_layers, new_layers, mode)
    if not is_added_copy(index, old_layers, new_layers, mode):
        return noted(recipe, f"layer {index} <- {source}")
    if mode == "identity":
        recipe = noted(recipe, f"layer {index} <- {source} (identity copy)")
        if name in OUTPUT_PROJECTIONS:
            # Zero weight and no moment: nothing of the old tensor's gradient carries over.
            recipe = noted(scaled(recipe, 0.0, 0.0), "zeroed output projection")
        return recipe
    recipe = noted(recipe, f"layer {index} <- {source} ({mode} copy)")
    return inexact(recipe, f"depth {mode}: a copied block adds its update to the residual stream again")
