"""Growth at a stage boundary, checkpoint to checkpoint: step_N/ (the old shape) -> step_N/grown/.

No rank gathers the model (a 143B MoE with its Adam moments is terabytes). The grown model's keys are
partitioned over all ranks by size; each rank reads from step_N only the source tensors of its own keys
(DCP reads by key), builds its grown tensors with the pure operators (growth_map.py, build.py), and the
ranks write one checkpoint together, each its own keys. It is written to grown.tmp/ and renamed to
grown/ when complete, with growth.json (what it was grown from and how) and a manifest of its files'
sizes and checksums (ppmoe.storage.manifest, as every checkpoint has). A killed transform is simply run
again (it is deterministic: randomness is seeded by (seed, stage, key)); a grown/ made by another growth
config, or damaged since, is never reused but grown again. The next stage then loads grown/ through DCP
at its own layout.

Optimizer moments (growth.optimizer: transform) are grown by the same recipes, rescaled to the grown
gradients; the Adam step count is kept.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass
from math import prod
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from ..config import GrowthOpsConfig
from ..model import GPTShape
from ..storage.manifest import build_manifest, combine, files_written_by, manifest_entry, share_finding, write_manifest
from .build import build_moment, build_weight
from .growth_map import growth_map
from .recipe import Recipe, growth_is_exact

GROWN_DIR = "grown"
GROWTH_MANIFEST = "growth.json"  # what was grown from what, and how (the file manifest is manifest.json)
MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass(frozen=True)
class GrowthSpec:
    """Everything that decides the grown tensors."""

    old: GPTShape
    new: GPTShape
    ops: GrowthOpsConfig
    seed: int
    stage: str  # the name of the stage grown into (part of every noise seed)
    moments: bool  # also grow the optimizer's moments

    def manifest(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))


@dataclass(frozen=True)
class GrowthReport:
    path: Path
    seconds: float
    exact: bool
    notes: list[str]


def partition_keys(recipes: dict[str, Recipe], world_size: int) -> list[list[str]]:
    """Keys per rank, balanced by size: largest first, each to the least-loaded rank (the same answer on
    every rank, so no rank needs to ask the others)."""
    loads, parts = [0] * world_size, [[] for _ in range(world_size)]
    for key in sorted(recipes, key=lambda k: (-prod(recipes[k].shape), k)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        parts[rank].append(key)
        loads[rank] += prod(recipes[key].shape)
    return parts


def read_tensors(checkpoint: Path, keys: set[str]) -> dict[str, torch.Tensor]:
    """The tensors saved under `keys` (flattened DCP keys, e.g. model.layers.0.attention.wq.weight), read
    by this rank alone."""
    if not keys:
        return {}
    stored = dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    missing = sorted(k for k in keys if k not in stored)
    if missing:
        raise KeyError(f"{checkpoint} has no {missing[0]} (and {len(missing) - 1} more); it was not saved at the "
                       f"stage shape the growth plan expects")
    out = {k: torch.empty(stored[k].size, dtype=stored[k].properties.dtype) for k in keys}
    dcp.load(out, checkpoint_id=str(checkpoint), no_dist=True)
    return out


def grow_tensors(checkpoint: Path, spec: GrowthSpec, recipes: dict[str, Recipe], keys: list[str]
                 ) -> dict[str, torch.Tensor]:
    """This rank's part of the grown checkpoint: model.<key> (and optim.state.<key>.<moment|step>)."""
    sources = {f"model.{recipes[k].source}" for k in keys if recipes[k].source is not None}
    # Fresh tensors (no source) get the step count of the embedding, which every GPT has.
    step_of = {k: recipes[k].source or "tok_embeddings.weight" for k in keys}
    if spec.moments:
        sources |= {f"optim.state.{recipes[k].source}.{m}" for k in keys if recipes[k].source for m in MOMENTS}
        sources |= {f"optim.state.{step_of[k]}.step" for k in keys}
    old = read_tensors(checkpoint, sources)
    out = {}
    for key in keys:
        recipe = recipes[key]
        source = old.get(f"model.{recipe.source}")
        out[f"model.{key}"] = build_weight(recipe, source, key, spec.seed, spec.stage, spec.ops.noise)
        if spec.moments:
            for moment in MOMENTS:
                out[f"optim.state.{key}.{moment}"] = build_moment(
                    recipe, old.get(f"optim.state.{recipe.source}.{moment}"), moment)
            out[f"optim.state.{key}.step"] = old[f"optim.state.{step_of[key]}.step"].clone()
    return out


def gather(value, world_size: int) -> list:
    """Every rank's `value` (collective)."""
    if world_size == 1:
        return [value]
    gathered = [None] * world_size
    dist.all_gather_object(gathered, value)
    return gathered


def grown_matches(target: Path, spec: GrowthSpec, rank: int, world_size: int) -> bool:
    """Whether target holds this growth, intact (collective: the ranks share the checksumming)."""
    manifest = target / GROWTH_MANIFEST
    same = (target / ".metadata").is_file() and manifest.is_file() and json.loads(manifest.read_text()) == spec.manifest()
    return same and combine(gather(share_finding(target, rank, world_size), world_size)).ok


def write_file_manifest(tmp: Path, rank: int, world_size: int) -> None:
    """The manifest of the grown checkpoint's files, each rank checksumming what it wrote (collective)."""
    mine = {name: manifest_entry(tmp / name) for name in files_written_by(tmp, rank) if (tmp / name).is_file()}
    if rank == 0:
        mine[GROWTH_MANIFEST] = manifest_entry(tmp / GROWTH_MANIFEST)
    entries = {name: entry for part in gather(mine, world_size) for name, entry in part.items()}
    if rank == 0:
        write_manifest(tmp, build_manifest(-1, world_size, entries))


def publish(tmp: Path, target: Path) -> None:
    """Make the grown checkpoint visible at once: complete, or not at all."""
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


def grow_checkpoint(checkpoint: Path, spec: GrowthSpec, rank: int, world_size: int, no_dist: bool) -> GrowthReport:
    """Collective: every rank calls it. Writes checkpoint/grown/ (unless a matching one is there) and
    returns where it is, how long it took and whether the growth preserves the function."""
    start = time.perf_counter()
    recipes = growth_map(spec.old, spec.new, spec.ops)
    exact, notes = growth_is_exact(recipes)
    target, tmp = checkpoint / GROWN_DIR, checkpoint / f"{GROWN_DIR}.tmp"
    if grown_matches(target, spec, rank, world_size):
        return GrowthReport(target, 0.0, exact, notes)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a transform killed before it finished
        tmp.mkdir(parents=True)
    dist.barrier()
    mine = partition_keys(recipes, world_size)[rank]
    dcp.save(grow_tensors(checkpoint, spec, recipes, mine), checkpoint_id=str(tmp), no_dist=no_dist)
    if rank == 0:
        (tmp / GROWTH_MANIFEST).write_text(json.dumps(spec.manifest(), indent=1))
    dist.barrier()
    write_file_manifest(tmp, rank, world_size)
    dist.barrier()
    if rank == 0:
        publish(tmp, target)
    dist.barrier()
    return GrowthReport(target, time.perf_counter() - start, exact, notes)
