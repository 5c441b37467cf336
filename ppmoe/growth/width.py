"""Width growth d -> n*d by cloning the residual stream (growth.ops.width='clone').

The grown model carries x' = [x; x; ...; x] (n copies) wherever the old one carries x:
- RMSNorm: mean(x'^2) = mean(x^2), so with tiled gains RMSNorm(x') = tile(RMSNorm(x)), epsilon included.
- A linear map whose input is tiled sums over the copies, so its blocks are W/n; one whose output is
  tiled repeats its rows. With both tiled (wq, wk, wv, wo) the result is n x n blocks of W/n.
- Heads grow with d (H' = n*H, KV' = n*KV, head_dim fixed): new head c*H + j is old head j, and under
  GQA query head c*H + j reads kv head (c*H + j) // (H/KV) = c*KV + j // (H/KV), a copy of the kv head
  it read before. RoPE and the 1/sqrt(head_dim) attention scale only see head_dim: unchanged.
- The output layer reads the tiled stream (W/n): the logits are unchanged.
Exact (to fp32 rounding of the longer sums). Refused: any other ratio, more heads at a fixed d_model
(head_dim and the rotary frequencies would change), and tied embeddings (the embedding wants E, the
output E/n).

Gradients (the optimizer-moment transform), at the symmetric point: each copy of the stream gets 1/n of
the old stream's gradient. So a tensor whose output axis is tiled (or that is itself tiled: norm gains,
the embedding) has grad_scale 1/n; one whose only tiled axis is its input has 1 (old output gradient
times an unchanged input). A tiled input axis is the copy axis where symmetry-breaking noise goes.
"""

from __future__ import annotations

from ..model.gpt import GPTShape
from .recipe import Recipe, Tile, noted, reading_copies, scaled, with_steps

WIDTH_AXES = {
    # name (top-level key or name inside a layer): (tiled axes, input axis if it is tiled, output tiled)
    "tok_embeddings.weight": ((1,), None, True),                     # [V, d]
    "norm.weight": ((0,), None, True),                               # [d]
    "output.weight": ((1,), 1, False),                               # [V, d]
    "attention_norm.weight": ((0,), None, True),                     # [d]
    "ffn_norm.weight": ((0,), None, True),                           # [d]
    "attention.wq.weight": ((0, 1), 1, True),                        # [H*hd, d]
    "attention.wk.weight": ((0, 1), 1, True),                        # [KV*hd, d]
    "attention.wv.weight": ((0, 1), 1, True),                        # [KV*hd, d]
    "attention.wo.weight": ((0, 1), 1, True),                        # [d, H*hd]
    "feed_forward.w1.weight": ((1,), 1, False),                      # [f, d]
    "feed_forward.w3.weight": ((1,), 1, False),                      # [f, d]
    "feed_forward.w2.weight": ((0,), None, True),                    # [d, f]
    "feed_forward.router.gate.weight": ((1,), 1, False),             # [E, d]
    "feed_forward.experts.w1": ((1,), 1, False),                     # [E, d, h]
    "feed_forward.experts.w3": ((1,), 1, False),                     # [E, d, h]
    "feed_forward.experts.w2": ((2,), None, True),                   # [E, h, d]
    "feed_forward.shared_expert.w1.weight": ((1,), 1, False),        # [s, d]
    "feed_forward.shared_expert.w3.weight": ((1,), 1, False),        # [s, d]
    "feed_forward.shared_expert.w2.weight": ((0,), None, True),      # [d, s]
    "feed_forward.shared_expert.gate.weight": ((1,), 1, False),      # [1, d]
}


def width_factor(old: GPTShape, new: GPTShape) -> int:
    """n = d'/d, checked: heads grow with it and embeddings are untied. ValueError otherwise."""
    d, d2 = old.d_model, new.d_model
    if d2 == d:
        if (new.n_heads, new.n_kv_heads) != (old.n_heads, old.n_kv_heads):
            raise ValueError(f"model.n_heads/n_kv_heads {old.n_heads}/{old.n_kv_heads} -> "
                             f"{new.n_heads}/{new.n_kv_heads} at a fixed d_model={d}: head_dim and the rotary "
                             f"frequencies would change (grow heads only with d_model)")
        return 1
    if d2 < d or d2 % d:
        raise ValueError(f"model.d_model {d} -> {d2}: width growth clones the residual stream and needs an "
                         f"integer ratio >= 1")
    n = d2 // d
    if new.n_heads != n * old.n_heads or new.n_kv_heads != n * old.n_kv_heads:
        raise ValueError(f"model.d_model {d} -> {d2} (x{n}) needs n_heads {old.n_heads} -> {n * old.n_heads} and "
                         f"n_kv_heads {old.n_kv_heads} -> {n * old.n_kv_heads} (head_dim fixed); got "
                         f"{new.n_heads} and {new.n_kv_heads}")
    if old.tie_embeddings or new.tie_embeddings:
        raise ValueError(f"model.d_model {d} -> {d2} with model.tie_embeddings: the embedding must be tiled "
                         f"and the output divided by {n}, which one shared tensor cannot be")
    return n


def clone_width(recipe: Recipe, name: str, times: int) -> Recipe:
    """Tile every d-sized (and heads) axis of tensor `name` `times` times; identity for 1."""
    if times == 1:
        return recipe
    if name not in WIDTH_AXES:
        raise ValueError(f"no width-growth rule for tensor {name!r}")
    axes, input_axis, output_tiled = WIDTH_AXES[name]
    recipe = with_steps(recipe, *(Tile(axis, times) for axis in axes))
    scale = 1.0 / times if input_axis is not None else 1.0
    grad_scale = 1.0 / times if output_tiled else 1.0
    note = f"tile d x{times}, /{times}" if input_axis is not None else f"tile d x{times}"
    recipe = noted(scaled(recipe, scale, grad_scale), note)
    return reading_copies(recipe, input_axis, times) if input_axis is not None else recipe
