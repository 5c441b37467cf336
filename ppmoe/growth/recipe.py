"""Recipes: how one tensor of the grown model is made from at most one tensor of the old model.

A recipe is plain data (it compares equal, pickles and prints), so the same map can be computed on
every rank and each rank can build any subset of the keys. The structural steps below are the only
ways a tensor is rearranged; scales, exactness and notes are added by the operator families
(depth, experts, ffn, width) and multiply when they compose.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

NOT_EXACT = "NOT exact: "
"""Prefix of the note fragments that say why a tensor's operator does not preserve the function."""


@dataclass(frozen=True)
class Tile:
    """Whole-tensor tiling along `axis`: index c*size + j of the result is index j of the input (c < times)."""

    axis: int
    times: int

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        return t.repeat(*[self.times if a == self.axis else 1 for a in range(t.dim())])

    def shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(s * self.times if a == self.axis else s for a, s in enumerate(shape))


@dataclass(frozen=True)
class RepeatEach:
    """Each index repeated in place along `axis`: index e*times + c of the result is index e of the input."""

    axis: int
    times: int

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        return t.repeat_interleave(self.times, dim=self.axis)

    def shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(s * self.times if a == self.axis else s for a, s in enumerate(shape))


@dataclass(frozen=True)
class Transpose:
    """Swap two axes (a dense [out, in] weight becomes an expert's [in, out])."""

    dim0: int
    dim1: int

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        return t.transpose(self.dim0, self.dim1)

    def shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        out = list(shape)
        out[self.dim0], out[self.dim1] = shape[self.dim1], shape[self.dim0]
        return tuple(out)


@dataclass(frozen=True)
class NewAxis:
    """Insert an axis of `size` equal copies at `axis` (one dense FFN becomes E identical experts)."""

    axis: int
    size: int

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        expanded = t.unsqueeze(self.axis)
        return expanded.expand(*[self.size if a == self.axis else -1 for a in range(expanded.dim())])

    def shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape[:self.axis] + (self.size,) + shape[self.axis:]


@dataclass(frozen=True)
class ChopIntoExperts:
    """Cut `axis` (an expert's hidden axis) into `parts` equal slices and make each slice an expert of
    its own along axis 0, expert-major: [E, ..., h, ...] -> [E*parts, ..., h/parts, ...], new expert
    e*parts + c = slice [c*h/parts, (c+1)*h/parts) of old expert e."""

    axis: int
    parts: int

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        size = t.shape[self.axis]
        sliced = t.unflatten(self.axis, (self.parts, size // self.parts))  # [E, ..., parts, h/parts, ...]
        return sliced.movedim(self.axis, 1).flatten(0, 1)

    def shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        out = list(shape)
        out[0] *= self.parts
        out[self.axis] //= self.parts
        return tuple(out)


Step = Tile | RepeatEach | Transpose | NewAxis | ChopIntoExperts


def apply_steps(tensor: torch.Tensor, steps: tuple[Step, ...]) -> torch.Tensor:
    """The source tensor rearranged by `steps` in order (a view or a new tensor; callers copy)."""
    for step in steps:
        tensor = step.apply(tensor)
    return tensor


@dataclass(frozen=True)
class Recipe:
    """How one tensor of the grown model is made from at most one tensor of the old model."""

    source: str | None
    """Old key read, or None for a fresh tensor (a new router gate, a new shared expert)."""
    steps: tuple[Step, ...]
    """Structural steps applied in order to the source."""
    scale: float
    """The weight is multiplied by this after the steps (1/n for tiled inputs, m for split or duplicated
    w2, 0 for zeroed blocks, E/k for upcycling without renormalisation)."""
    grad_scale: float
    """Gradient of the grown tensor relative to the structured old gradient (optimizer-moment transform:
    exp_avg * g, exp_avg_sq * g**2)."""
    copy_axis: int | None
    """An input axis made of `copies` equal blocks (where symmetry-breaking noise goes)."""
    copies: int
    fresh_std: float | None
    """For source None: normal(0, fresh_std) (zeros when 0)."""
    shape: tuple[int, ...]
    """Shape of the grown tensor."""
    exact: bool
    """This tensor's operator preserves the function."""
    note: str
    """What was done, '; '-separated, with the reason when not exact."""


def copy_of(source: str, shape: tuple[int, ...]) -> Recipe:
    """The identity recipe: the old tensor `source` of `shape`, unchanged."""
    return Recipe(source=source, steps=(), scale=1.0, grad_scale=1.0, copy_axis=None, copies=1,
                  fresh_std=None, shape=tuple(shape), exact=True, note="")


def fresh(shape: tuple[int, ...], std: float, scale: float, note: str) -> Recipe:
    """A tensor drawn anew: normal(0, std) times `scale` (zeros when either is 0); no moment to carry."""
    return Recipe(source=None, steps=(), scale=scale, grad_scale=0.0, copy_axis=None, copies=1,
                  fresh_std=std, shape=tuple(shape), exact=True, note=note)


def noted(recipe: Recipe, fragment: str) -> Recipe:
    return dataclasses.replace(recipe, note=f"{recipe.note}; {fragment}" if recipe.note else fragment)


def inexact(recipe: Recipe, reason: str) -> Recipe:
    """Mark the recipe as not function-preserving; `reason` has no layer numbers, so notes deduplicate."""
    return dataclasses.replace(noted(recipe, NOT_EXACT + reason), exact=False)


def with_steps(recipe: Recipe, *steps: Step) -> Recipe:
    shape = recipe.shape
    for step in steps:
        shape = step.shape(shape)
    return dataclasses.replace(recipe, steps=recipe.steps + steps, shape=shape)


def scaled(recipe: Recipe, scale: float = 1.0, grad_scale: float = 1.0) -> Recipe:
    """Composed operators' scales and gradient scales multiply."""
    return dataclasses.replace(recipe, scale=recipe.scale * scale, grad_scale=recipe.grad_scale * grad_scale)


def reading_copies(recipe: Recipe, axis: int, copies: int) -> Recipe:
    """Record that input `axis` now reads `copies` equal blocks. With these operators only one of them
    tiles a tensor's input axis (width: d; FFN tiling: the hidden axis of w2), never both."""
    assert recipe.copy_axis is None, f"two operators tile input axes of one tensor ({recipe.note})"
    return dataclasses.replace(recipe, copy_axis=axis, copies=copies)


def growth_is_exact(recipes: dict[str, Recipe]) -> tuple[bool, list[str]]:
    """Whole-model exactness, and why not: the reasons of the non-exact keys, each once, in key order."""
    reasons: dict[str, None] = {}
    for recipe in recipes.values():
        if not recipe.exact:
            for fragment in recipe.note.split("; "):
                if fragment.startswith(NOT_EXACT):
                    reasons[fragment[len(NOT_EXACT):]] = None
    return all(r.exact for r in recipes.values()), list(reasons)
