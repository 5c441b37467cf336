"""growth_map: the recipe of every tensor of the grown model, composed from the operator families.

For one new tensor the operators compose in this order: depth picks the source layer (and may zero the
tensor), then experts (or upcycling), then FFN hidden tiling, then width. Each works on the tensor in
the layout the previous ones left, which is the grown model's layout for the axes it touches; scales
and gradient scales multiply. Keys and shapes come from the models themselves (built on the meta
device: no memory, no random draws), so every key of GPT(new).state_dict() gets exactly one recipe.
"""

from __future__ import annotations

import dataclasses
import re

from ..config.schema import GrowthOpsConfig
from ..model import GPTShape, parameter_shapes
from .depth import check_depth, grow_depth, source_layer
from .experts import (ROUTER, UPCYCLE_SOURCES, check_experts, grow_experts, hidden_after_experts, new_router,
                      new_shared_expert, upcycle)
from .ffn import hidden_ratio, tile_hidden
from .recipe import Recipe, copy_of, inexact
from .width import clone_width, width_factor

LAYER_KEY = re.compile(r"layers\.(\d+)\.(.+)")
SHARED_PREFIX = "feed_forward.shared_expert."
NORM_GAINS = ("norm.weight", "attention_norm.weight", "ffn_norm.weight")


def check_pair(old: GPTShape, new: GPTShape, ops: GrowthOpsConfig) -> None:
    """Refuse shape pairs no operator maps (config validation refuses them earlier: a safety net)."""
    if new.vocab_size != old.vocab_size:
        raise ValueError(f"model.vocab_size {old.vocab_size} -> {new.vocab_size}: the vocabulary cannot change "
                         f"at a growth")
    if new.tie_embeddings and not old.tie_embeddings:
        raise ValueError("model.tie_embeddings false -> true: separate embedding and output weights cannot "
                         "become one tensor")
    if old.moe is not None and new.moe is not None:
        if new.moe.every != old.moe.every:
            raise ValueError(f"moe.every {old.moe.every} -> {new.moe.every}: layer types must keep their places")
        if old.moe.shared_expert_hidden and not new.moe.shared_expert_hidden:
            raise ValueError(f"moe.shared_expert_hidden {old.moe.shared_expert_hidden} -> 0: a shared expert "
                             f"cannot be removed")
        check_experts(old.moe, new.moe, ops.experts)
    check_depth(old.n_layers, new.n_layers, ops.depth)


def ffn_transition(index: int, source: int, old: GPTShape, new: GPTShape) -> str:
    """How new layer `index`'s FFN comes from old layer `source`'s: 'dense', 'moe' or 'upcycle'."""
    new_moe, old_moe = new.is_moe_layer(index), old.is_moe_layer(source)
    if new_moe:
        return "moe" if old_moe else "upcycle"
    if old_moe:
        raise ValueError(f"layer {index} of the new model is dense but copies old layer {source}, an MoE layer: "
                         f"an MoE layer cannot become dense (keep moe.every, or stack with n_layers a multiple "
                         f"of it)")
    return "dense"


def ffn_source_name(name: str, transition: str, old: GPTShape) -> str | None:
    """The tensor of the source layer that FFN tensor `name` is made from, or None when it is new."""
    if transition == "dense":
        return name
    if name.startswith(SHARED_PREFIX):
        had_shared = transition == "moe" and old.moe.shared_expert_hidden > 0
        return name if had_shared else None
    if transition == "moe":
        return name
    return UPCYCLE_SOURCES.get(name)  # None for the router: upcycled layers get a new one


def fresh_ffn_tensor(name: str, shape: tuple[int, ...], new: GPTShape, ops: GrowthOpsConfig) -> Recipe:
    if name == ROUTER:
        return new_router(shape, ops.router_std)
    return new_shared_expert(name, shape, new.init_std)


def grow_ffn(recipe: Recipe, name: str, transition: str, old: GPTShape, new: GPTShape,
             ops: GrowthOpsConfig) -> Recipe:
    """Experts (or upcycling), then hidden tiling, on FFN tensor `name`."""
    if transition == "dense":
        return tile_hidden(recipe, name, hidden_ratio(old.ffn_hidden, new.ffn_hidden, "model.ffn_hidden"))
    if name.startswith(SHARED_PREFIX):
        ratio = hidden_ratio(old.moe.shared_expert_hidden, new.moe.shared_expert_hidden, "moe.shared_expert_hidden")
        return tile_hidden(recipe, name, ratio)
    if transition == "upcycle":
        recipe = upcycle(recipe, name, new.moe, ops.router_std)
        return tile_hidden(recipe, name, hidden_ratio(old.ffn_hidden, new.moe.expert_hidden, "moe.expert_hidden"))
    recipe = grow_experts(recipe, name, old.moe, new.moe, ops.experts)
    if name == ROUTER:
        return recipe
    hidden = hidden_after_experts(old.moe, new.moe, ops.experts)
    return tile_hidden(recipe, name, hidden_ratio(hidden, new.moe.expert_hidden, "moe.expert_hidden"))


def setting_caveats(recipe: Recipe, name: str, old: GPTShape, new: GPTShape) -> Recipe:
    """Settings that change the function without changing any tensor."""
    if name == "attention.wq.weight" and new.rope_theta != old.rope_theta:
        recipe = inexact(recipe, "model.rope_theta changed (other rotary frequencies)")
    if name in NORM_GAINS and new.norm_eps != old.norm_eps:
        recipe = inexact(recipe, "model.norm_eps changed")
    return recipe


def key_recipe(key: str, shape: tuple[int, ...], old: GPTShape, new: GPTShape, ops: GrowthOpsConfig, width: int,
               old_shapes: dict[str, tuple[int, ...]]) -> Recipe:
    """The recipe of new tensor `key` of grown `shape`."""
    match = LAYER_KEY.fullmatch(key)
    if match is None:  # tok_embeddings, norm, output
        recipe = copy_of(key, old_shapes[key])
        return clone_width(setting_caveats(recipe, key, old, new), key, width)
    index, name = int(match.group(1)), match.group(2)
    source = source_layer(index, old.n_layers, new.n_layers, ops.depth)
    transition = ffn_transition(index, source, old, new) if name.startswith("feed_forward.") else None
    source_name = ffn_source_name(name, transition, old) if transition else name
    if source_name is None:
        # Drawn at the grown shape: the other operators have nothing to rearrange.
        return grow_depth(fresh_ffn_tensor(name, shape, new, ops), index, name, old.n_layers, new.n_layers, ops.depth)
    source_key = f"layers.{source}.{source_name}"
    if source_key not in old_shapes:
        raise ValueError(f"{key}: its source {source_key} is not a tensor of the old model")
    recipe = grow_depth(copy_of(source_key, old_shapes[source_key]), index, name, old.n_layers, new.n_layers,
                        ops.depth)
    if transition:
        recipe = grow_ffn(recipe, name, transition, old, new, ops)
    return clone_width(setting_caveats(recipe, name, old, new), name, width)


def growth_map(old: GPTShape, new: GPTShape, ops: GrowthOpsConfig) -> dict[str, Recipe]:
    """One recipe per key of GPT(new).state_dict(), in that order. ValueError, naming the dimension, for
    shape pairs no operator can map."""
    check_pair(old, new, ops)
    width = width_factor(old, new)
    old_shapes, new_shapes = parameter_shapes(old), parameter_shapes(new)
    recipes = {}
    for key, shape in new_shapes.items():
        recipe = key_recipe(key, shape, old, new, ops, width, old_shapes)
        if recipe.shape != shape:  # a bug here, not a bad config
            raise AssertionError(f"{key}: recipe builds {recipe.shape}, the model has {shape} ({recipe.note})")
        recipes[key] = recipe if recipe.note else dataclasses.replace(recipe, note="copy")
    return recipes
