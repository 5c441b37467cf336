"""Distributed checkpoints with torch.distributed.checkpoint (DCP), written atomically.

Layout: <dir>/step_<N>/ holds DCP's files (each rank writes its own shards, `.metadata` describes the
global tensors, so a checkpoint loads into any parallel layout) plus rng/rank<R>.pt. A checkpoint is
written to step_<N>.tmp and renamed only after every rank has finished, so a crash mid-save leaves a
.tmp directory that is never picked up, and the previous checkpoint stays intact.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict, set_model_state_dict,
                                                     set_state_dict)

STEP_DIR = re.compile(r"^step_(\d+)$")


def complete_checkpoints(root: Path) -> list[Path]:
    """Finished checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = STEP_DIR.match(child.name)
        if match and (child / ".metadata").is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def rng_state() -> dict[str, Any]:
    state = {"cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.random.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def require_complete(path: Path) -> None:
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no .metadata); "
                                f"point train.resume at a step_* directory")


class CheckpointManager:
    """Saves and restores model, optimizer and trainer state (step, data position, RNG)."""

    def __init__(self, root: str | Path, keep: int, rank: int):
        self.root = Path(root)
        self.keep = keep
        self.rank = rank
        # One process needs no cross-rank planning; skipping it also avoids a measured ~1.5x slowdown of
        # every later CPU step after a distributed save (benchmarks/checkpoint_step_time.py).
        self.no_dist = not dist.is_initialized() or dist.get_world_size() == 1

    def latest(self) -> Path | None:
        done = complete_checkpoints(self.root)
        return done[-1] if done else None

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict) -> Path:
        """Collective: every rank calls it. `trainer_state` must be the same on all ranks."""
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f"step_{step:08d}.tmp"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crashed save
            tmp.mkdir(parents=True)
        dist.barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd, "trainer": trainer_state}, checkpoint_id=str(tmp),
                 no_dist=self.no_dist)
        (tmp / "rng").mkdir(exist_ok=True)
        torch.save(rng_state(), tmp / "rng" / f"rank{self.rank}.pt")
        dist.barrier()
        if self.rank == 0:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)  # atomic: the checkpoint appears complete or not at all
            self.prune()
        dist.barrier()
        return final

    def load_weights(self, path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                     moments_only: bool = False) -> None:
        """Restore the model (and the optimizer, when given) in place from `path`, resharding to the current
        layout. `moments_only`: the checkpoint holds optimizer state but no param_groups (a grown
        checkpoint): the optimizer keeps its own groups (lr, betas, decay come from the config anyway)."""
        require_complete(path)
        if optimizer is None:
            model_sd = get_model_state_dict(model)
            dcp.load({"model": model_sd}, checkpoint_id=str(path), no_dist=self.no_dist)
            set_model_state_dict(model, model_sd)
            return
        model_sd, optim_sd = get_state_dict(model, optimizer)
        wanted = {"state": optim_sd["state"]} if moments_only else optim_sd
        dcp.load({"model": model_sd, "optim": wanted}, checkpoint_id=str(path), no_dist=self.no_dist)  # in place
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)

    def restore_rng(self, path: Path) -> None:
        rng_file = path / "rng" / f"rank{self.rank}.pt"
        if rng_file.is_file():  # absent when resuming at another world size: keep the fresh seed
            set_rng_state(torch.load(rng_file, weights_only=False))

    def read_trainer_state(self, path: Path, trainer_template: dict) -> dict:
        """Only the trainer state of a checkpoint (step, data position, ...), without touching the model.
        Keys the checkpoint does not hold (it was written by an older ppmoe) keep the template's values."""
        require_complete(path)
        stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        held = {key: value for key, value in trainer_template.items()
                if any(name == f"trainer.{key}" or name.startswith(f"trainer.{key}.") for name in stored)}
        state = {"trainer": held}
        dcp.load(state, checkpoint_id=str(path), no_dist=self.no_dist)
        return {**trainer_template, **state["trainer"]}

    def prune(self) -> None:
        if self.keep <= 0:
            return
        for old in complete_checkpoints(self.root)[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
