"""Building grown tensors from recipes: weights (with symmetry-breaking noise), optimizer moments, and
the whole state dict at once (the reference the distributed transform is tested against).

Every random draw has its own generator seeded from (seed, stage, op, key) through crc32 (not Python's
hash(), which is salted per process, and not the global generator), so a key's tensor does not depend
on which other keys were built, in what order, or in which process.
"""

from __future__ import annotations

import zlib

import torch

from ..config.schema import GrowthOpsConfig
from ..model.gpt import GPTShape
from .growth_map import growth_map
from .recipe import Recipe, apply_steps

MOMENT_KINDS = ("exp_avg", "exp_avg_sq")


def key_generator(seed: int, stage: str, op: str, key: str) -> torch.Generator:
    """The CPU generator of one random draw: op ('noise', 'router', 'fresh') on tensor `key`."""
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}/{stage}/{op}/{key}".encode()))


def fresh_tensor(recipe: Recipe, key: str, seed: int, stage: str) -> torch.Tensor:
    """normal(0, fresh_std) * scale of the recipe's shape; zeros when either is 0."""
    if not recipe.fresh_std or recipe.scale == 0:
        return torch.zeros(recipe.shape, dtype=torch.float32)
    op = "router" if key.endswith("router.gate.weight") else "fresh"
    values = torch.randn(recipe.shape, generator=key_generator(seed, stage, op, key), dtype=torch.float32)
    return values * (recipe.fresh_std * recipe.scale)


def zero_sum_noise(weight: torch.Tensor, axis: int, copies: int, std: float,
                   generator: torch.Generator) -> torch.Tensor:
    """normal(0, std) noise of weight's shape whose `copies` blocks along `axis` sum to zero.
    The blocks are what a tiled input's copies read, so weight @ tile(x) is unchanged."""
    noise = torch.randn(weight.shape, generator=generator, dtype=torch.float32)
    blocks = noise.unflatten(axis, (copies, weight.shape[axis] // copies))  # [..., copies, block, ...]
    centred = blocks - blocks.mean(dim=axis, keepdim=True)
    return centred.flatten(axis, axis + 1) * std


def structured(recipe: Recipe, source: torch.Tensor, key: str) -> torch.Tensor:
    """The source in fp32 rearranged by the recipe's steps, in fresh contiguous storage."""
    out = apply_steps(source.detach().to(torch.float32), recipe.steps).contiguous()
    if out.untyped_storage().data_ptr() == source.untyped_storage().data_ptr():  # steps left a view
        out = out.clone()
    if tuple(out.shape) != recipe.shape:
        raise ValueError(f"{key}: source {recipe.source} of shape {tuple(source.shape)} builds {tuple(out.shape)}, "
                         f"expected {recipe.shape}")
    return out


def build_weight(recipe: Recipe, source: torch.Tensor | None, key: str, seed: int, stage: str,
                 noise: float) -> torch.Tensor:
    """The grown tensor `key` (fp32, contiguous, fresh storage) from the old tensor `recipe.source`.
    noise > 0 adds zero-sum noise of std noise * std(grown tensor) on the recipe's copy axis."""
    if recipe.source is None:
        return fresh_tensor(recipe, key, seed, stage)
    if source is None:
        raise ValueError(f"{key} is built from {recipe.source}, which was not given")
    if recipe.scale == 0:
        return torch.zeros(recipe.shape, dtype=torch.float32)
    weight = structured(recipe, source, key)
    if recipe.scale != 1:
        weight.mul_(recipe.scale)
    if noise > 0 and recipe.copy_axis is not None and recipe.copies > 1:
        std = noise * weight.std().item()
        generator = key_generator(seed, stage, "noise", key)
        # Drawn on CPU (the generator's device) whatever the weight's device, so every layout draws the same.
        weight.add_(zero_sum_noise(weight, recipe.copy_axis, recipe.copies, std, generator).to(weight.device))
    return weight


def build_moment(recipe: Recipe, source: torch.Tensor | None, kind: str) -> torch.Tensor:
    """AdamW moment `kind` of the grown tensor from the old one: the structured source times grad_scale
    (exp_avg) or grad_scale**2 (exp_avg_sq); zeros for new or zeroed tensors. No noise."""
    if kind not in MOMENT_KINDS:
        raise ValueError(f"moment kind {kind!r}; choose one of {', '.join(MOMENT_KINDS)}")
    if recipe.source is None or source is None or recipe.scale == 0:
        return torch.zeros(recipe.shape, dtype=torch.float32)
    factor = recipe.grad_scale if kind == "exp_avg" else recipe.grad_scale ** 2
    moment = structured(recipe, source, recipe.source)
    return moment.mul_(factor) if factor != 1 else moment


def apply_growth(state: dict[str, torch.Tensor], old: GPTShape, new: GPTShape, ops: GrowthOpsConfig, seed: int,
                 stage: str) -> dict[str, torch.Tensor]:
    """The grown model's full state dict from the old one's (the single-process reference)."""
    recipes = growth_map(old, new, ops)
    missing = sorted({r.source for r in recipes.values() if r.source is not None} - state.keys())
    if missing:
        raise ValueError(f"the old state dict lacks {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    return {key: build_weight(recipe, state[recipe.source] if recipe.source else None, key, seed, stage, ops.noise)
            for key, recipe in recipes.items()}
