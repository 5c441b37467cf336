"""Distributed checkpoints with torch.distributed.checkpoint (DCP), written atomically and verifiable.

Layout: <dir>/step_<N>/ holds DCP's files (each rank writes its own shards, `.metadata` describes the
global tensors, so a checkpoint loads into any parallel layout), rng/rank<R>.pt, and manifest.json. A
checkpoint is written to step_<N>.tmp and renamed only after every rank has finished, so a crash mid-save
leaves a .tmp directory that is never picked up, and the previous checkpoint stays intact.

manifest.json is written last, just before the rename: the size and CRC-32 of every file of the
checkpoint, each rank checksumming the files it wrote itself. It lets a resume tell a damaged checkpoint
(a truncated shard, a missing file, flipped bytes) from a good one and fall back to the newest good one
(`latest_good`), instead of failing on every restart or loading wrong weights silently. Checkpoints of an
older ppmoe have no manifest: they are accepted as unverified. A step's grown/ directory (the next stage's
weights, written into the finished step_<N>/ by ppmoe/growth/transform.py) is not in the manifest: it is
written after the checkpoint was published, and the growth manifest (growth.json) governs it.

A save that fails on any rank (most often a full disk) fails on every rank with one CheckpointError, after
the half-written step_<N>.tmp is removed; the checkpoints before it are never touched.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict, set_model_state_dict,
                                                     set_state_dict)

from ..errors import CheckpointError
from ..model import GPTShape
from ..model.record import read_model_record, shape_differences
from ..storage.failures import WriteFailure, attempt, describe_failure, reading
from ..storage.manifest import (NOT_IN_MANIFEST, Verdict, build_manifest, checkpoint_files, combine, files_written_by,
                                looks_intact, manifest_entry, share_finding, write_manifest)

STEP_DIR = re.compile(r"^step_(\d+)$")
TMP_DIR = re.compile(r"^step_(\d+)\.tmp$")


# ---- listing -------------------------------------------------------------------------------------------
def step_of(path: Path) -> int:
    return int(STEP_DIR.match(path.name).group(1))


def complete_checkpoints(root: Path) -> list[Path]:
    """Finished checkpoints under `root`, oldest first (not verified: see CheckpointManager.verify)."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = STEP_DIR.match(child.name)
        if match and (child / ".metadata").is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def newest_inside(directory: Path) -> Path | None:
    """The newest complete checkpoint in `directory` or in its checkpoints/ (a run directory)."""
    found = complete_checkpoints(directory) or complete_checkpoints(directory / "checkpoints")
    return found[-1] if found else None


def require_complete(path: Path) -> None:
    if not (path / ".metadata").is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no .metadata): point train.resume at a "
                              f"step_<N> directory written by ppmoe, or set train.resume=auto")


# ---- RNG -----------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    state = {"cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.random.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_rng_file(path: Path) -> None:
    """This rank's RNG state, flushed to disk before the manifest vouches for it."""
    path.parent.mkdir(exist_ok=True)
    with open(path, "wb") as f:
        torch.save(rng_state(), f)
        f.flush()
        os.fsync(f.fileno())


# ---- checking a train.resume path ----------------------------------------------------------------------
def resume_path_problem(path: Path) -> str | None:
    """Why `path` cannot be a checkpoint to resume from (checked without reading it), or None."""
    if not path.exists():
        return (f"{path} does not exist: point train.resume at a checkpoint directory (<run>/checkpoints/step_<N>), "
                f"or set train.resume=auto to continue from the newest checkpoint of checkpoint.dir")
    if not path.is_dir():
        return (f"{path} is a file, not a checkpoint directory: point train.resume at the step_<N> directory "
                f"(e.g. {path.parent}), or set train.resume=auto")
    if TMP_DIR.match(path.name):
        done = complete_checkpoints(path.parent)
        instead = f" such as {done[-1]}" if done else ""
        return (f"{path} is an interrupted save (step_<N>.tmp is renamed to step_<N> only once complete): point "
                f"train.resume at a finished checkpoint{instead}, or set train.resume=auto")
    if path.name in NOT_IN_MANIFEST:
        return (f"{path} is the next stage's grown model inside checkpoint {path.parent}, which a resume builds "
                f"itself: point train.resume at {path.parent}")
    if (path / ".metadata").is_file():
        record = read_model_record(path)
        if record is not None and record.model_only:
            return (f"{path} holds model weights only (written by `ppmoe import`), no optimizer or trainer state "
                    f"to resume: start a run from it with train.init_from={path}")
        return None
    newest = newest_inside(path)
    if (path / "checkpoints").is_dir():
        kind = "a run directory"
    elif any(STEP_DIR.match(c.name) or TMP_DIR.match(c.name) for c in path.iterdir()):
        kind = "a checkpoints directory"
    else:
        return (f"{path} is not a complete checkpoint (no .metadata): point train.resume at a step_<N> directory "
                f"written by ppmoe, or set train.resume=auto")
    if newest is None:
        return (f"{path} is {kind}, not a checkpoint, and holds no complete checkpoint: set train.resume=auto "
                f"(a fresh start where there is none) or point it at a step_<N> directory")
    return (f"{path} is {kind}, not a checkpoint: point train.resume at the newest checkpoint inside, {newest}, "
            f"or set train.resume=auto")


class CheckpointManager:
    """Saves and restores model, optimizer and trainer state (step, data position, RNG); verifies
    checkpoints against their manifests. Methods marked collective must be called by every rank."""

    def __init__(self, root: str | Path, keep: int, rank: int):
        self.root = Path(root)
        self.keep = keep
        self.rank = rank
        # One process needs no cross-rank planning; skipping it also avoids a measured ~1.5x slowdown of
        # every later CPU step after a distributed save (benchmarks/checkpoint_step_time.py).
        self.no_dist = not dist.is_initialized() or dist.get_world_size() == 1

    # ---- collectives (a no-op without a process group, e.g. a tool inspecting checkpoints) --------------
    @property
    def world_size(self) -> int:
        return dist.get_world_size() if dist.is_initialized() else 1

    def gather(self, value: Any) -> list[Any]:
        if not dist.is_initialized():
            return [value]
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, value)
        return out

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    # ---- finding checkpoints ----------------------------------------------------------------------------
    def latest(self) -> Path | None:
        """The newest complete checkpoint, not verified (see latest_good)."""
        done = complete_checkpoints(self.root)
        return done[-1] if done else None

    def verify(self, path: Path) -> Verdict:
        """Collective. Check `path` against its manifest: every file present, with its size and checksum.
        Each rank reads every world_size-th file; all ranks return the same verdict."""
        return combine(self.gather(share_finding(Path(path), self.rank, self.world_size)))

    def latest_good(self, log: Callable[[str], None]) -> Path | None:
        """Collective. The newest checkpoint that verifies (or an unverified one of an older ppmoe), None when
        there is no checkpoint. Every newer, damaged one is reported through `log` (called on every rank:
        pass one that prints on one, like MetricsLogger.info). Raises CheckpointError when checkpoints exist
        but all are damaged: starting over silently would throw the run away."""
        skipped = []
        for path in reversed(complete_checkpoints(self.root)):
            verdict = self.verify(path)
            if verdict.ok:
                for name, reason in skipped:
                    log(f"checkpoint {name} is damaged ({reason}): resuming from {path.name} instead")
                if verdict.reason:
                    log(f"note: {verdict.reason}")
                return path
            skipped.append((path.name, verdict.reason))
        if skipped:
            name, reason = skipped[0]
            raise CheckpointError(f"all {len(skipped)} checkpoints in {self.root} are damaged (the newest, {name}: "
                                  f"{reason}), so there is nothing to resume from: move {self.root} aside to start "
                                  f"the run over, or point train.resume at a good copy of a checkpoint")
        return None

    def check_explicit(self, path: str | Path, log: Callable[[str], None] | None = None) -> Path:
        """Collective. `path` (train.resume: PATH) if it is a checkpoint that verifies; otherwise a
        CheckpointError that says what the path is instead and what to point train.resume at. `log`, when
        given, receives the note that an older ppmoe's checkpoint is unverified."""
        path = Path(path)
        problem = resume_path_problem(path)
        if problem is not None:
            raise CheckpointError(f"train.resume: {problem}")
        verdict = self.verify(path)
        if not verdict.ok:
            raise CheckpointError(f"train.resume: checkpoint {path} is damaged ({verdict.reason}): point "
                                  f"train.resume at an older checkpoint, or set train.resume=auto, which resumes "
                                  f"from the newest checkpoint that verifies")
        if verdict.reason and log is not None:
            log(f"note: {verdict.reason}")
        return path

    def check_init_from(self, path: str | Path, shape: GPTShape) -> Path:
        """Collective. `path` (train.init_from) if it is a checkpoint that verifies and holds weights of
        `shape` (the first stage's); otherwise a CheckpointError saying what to change."""
        path = Path(path)
        if not (path / ".metadata").is_file():
            newest = newest_inside(path) if path.is_dir() else None
            instead = f"; the newest checkpoint inside is {newest}" if newest else ""
            raise CheckpointError(f"train.init_from: {path} is not a checkpoint (no .metadata){instead}: point it at "
                                  f"a directory written by `ppmoe import` or a step_<N> directory of a ppmoe run")
        verdict = self.verify(path)
        if not verdict.ok:
            raise CheckpointError(f"train.init_from: checkpoint {path} is damaged ({verdict.reason}): import or copy "
                                  f"it again")
        record = read_model_record(path)
        differences = shape_differences(record.shape, shape) if record is not None else []
        if differences:
            raise CheckpointError(f"train.init_from: {path} holds another model than the first stage's: "
                                  f"{'; '.join(differences)} (checkpoint -> config); set the config to the "
                                  f"checkpoint's values")
        return path

    # ---- saving -------------------------------------------------------------------------------------------
    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict,
             attachments: dict[str, bytes] | None = None) -> Path:
        """Collective: every rank calls it. `trainer_state` must be the same on all ranks. `attachments`:
        small files rank 0 adds to the checkpoint ({name: content}: model.json, tokenizer.json), so that it
        can be read without the run's config. A failure on any rank raises CheckpointError on every rank,
        with step_<N>.tmp removed."""
        final, tmp = self.root / f"step_{step:08d}", self.root / f"step_{step:08d}.tmp"
        _, error = attempt(self.start_tmp, tmp) if self.rank == 0 else (None, None)
        self.agree(step, tmp, error)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd, "trainer": trainer_state}
        entries, error = attempt(self.write_rank_files, tmp, state)
        gathered = self.agree(step, tmp, error, entries)
        _, error = (attempt(self.publish, step, tmp, final, gathered, attachments or {}) if self.rank == 0
                    else (None, None))
        self.agree(step, tmp, error)
        return final

    def start_tmp(self, tmp: Path) -> None:
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crashed save
        tmp.mkdir(parents=True)

    def write_rank_files(self, tmp: Path, state: dict) -> dict[str, dict]:
        """Write this rank's shards and RNG state; return the manifest entries of the files it wrote."""
        dcp.save(state, checkpoint_id=str(tmp), no_dist=self.no_dist)
        save_rng_file(tmp / "rng" / f"rank{self.rank}.pt")
        return {name: manifest_entry(tmp / name) for name in files_written_by(tmp, self.rank)}

    def publish(self, step: int, tmp: Path, final: Path, gathered: list[dict[str, dict]],
                attachments: dict[str, bytes]) -> None:
        """Rank 0: write the attachments and the manifest, then make the checkpoint visible at once, then
        rotate."""
        for name, content in attachments.items():
            (tmp / name).write_bytes(content)
        entries = {name: entry for part in gathered for name, entry in part.items()}
        # A file no rank claimed (DCP named it in a way files_written_by does not know) is checksummed
        # here rather than left out: the manifest must cover the whole checkpoint.
        for name in checkpoint_files(tmp):
            if name not in entries:
                entries[name] = manifest_entry(tmp / name)
        write_manifest(tmp, build_manifest(step, self.world_size, entries))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)  # atomic: the checkpoint appears complete or not at all
        self.prune()

    def agree(self, step: int, tmp: Path, error: BaseException | None, payload: Any = None) -> list[Any]:
        """Collective: every rank's payload, once every rank has finished its part of the save; if any rank
        failed, remove the half-written `tmp` and raise CheckpointError on all of them."""
        failure = describe_failure(error, self.rank) if error is not None else None
        reports = self.gather((failure, payload))
        failures = [f for f, _ in reports if f is not None]
        if not failures:
            return [p for _, p in reports]
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        self.barrier()  # tmp is gone on every rank's view before any rank reports it
        raise self.save_error(step, failures) from error

    def save_error(self, step: int, failures: list[WriteFailure]) -> CheckpointError:
        previous = [p for p in complete_checkpoints(self.root) if step_of(p) != step]
        intact = (f"the previous checkpoint {previous[-1].name} is intact" if previous
                  else "there is no earlier checkpoint")
        space = [f for f in failures if f.out_of_space]
        if space:
            return CheckpointError(f"no space left on device while saving step {step} to {self.root}: {intact}; free "
                                   f"space or set checkpoint.dir to another disk (rank {space[0].rank}: "
                                   f"{space[0].summary})")
        first = failures[0]
        return CheckpointError(f"saving step {step} to {self.root} failed on rank {first.rank} ({first.summary}): "
                               f"{intact}; fix the cause (permissions, the file system) or set checkpoint.dir to "
                               f"another disk, then resume with train.resume=auto")

    # ---- loading ------------------------------------------------------------------------------------------
    def load_weights(self, path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                     moments_only: bool = False) -> None:
        """Restore the model (and the optimizer, when given) in place from `path`, resharding to the current
        layout. `moments_only`: the checkpoint holds optimizer state but no param_groups (a grown
        checkpoint): the optimizer keeps its own groups (lr, betas, decay come from the config anyway)."""
        require_complete(path)
        if optimizer is None:
            model_sd = get_model_state_dict(model)
            with reading(path, "the model weights"):
                dcp.load({"model": model_sd}, checkpoint_id=str(path), no_dist=self.no_dist)
            set_model_state_dict(model, model_sd)
            return
        model_sd, optim_sd = get_state_dict(model, optimizer)
        own_names = [group["params"] for group in optim_sd["param_groups"]]
        wanted = {"state": optim_sd["state"]} if moments_only else optim_sd
        with reading(path, "the model and optimizer state"):
            dcp.load({"model": model_sd, "optim": wanted}, checkpoint_id=str(path), no_dist=self.no_dist)  # in place
        # The groups' parameter names are this rank's (pipeline ranks hold different parameters), but DCP
        # stored one rank's lists: keep ours, with the loaded hyperparameters. torch matches a tied weight
        # against these names, and would drop it where the stored list came from a rank without it.
        for group, names in zip(optim_sd["param_groups"], own_names):
            group["params"] = names
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)

    def restore_rng(self, path: Path) -> None:
        rng_file = path / "rng" / f"rank{self.rank}.pt"
        if rng_file.is_file():  # absent when resuming at another world size: keep the fresh seed
            with reading(path, f"the RNG state rng/{rng_file.name}"):
                state = torch.load(rng_file, weights_only=False)
            set_rng_state(state)

    def read_trainer_state(self, path: Path, trainer_template: dict) -> dict:
        """Only the trainer state of a checkpoint (step, data position, ...), without touching the model.
        Keys the checkpoint does not hold (it was written by an older ppmoe) keep the template's values."""
        require_complete(path)
        with reading(path, "the trainer state"):
            stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
            held = {key: value for key, value in trainer_template.items()
                    if any(name == f"trainer.{key}" or name.startswith(f"trainer.{key}.") for name in stored)}
            state = {"trainer": held}
            dcp.load(state, checkpoint_id=str(path), no_dist=self.no_dist)
        return {**trainer_template, **state["trainer"]}

    # ---- rotation -----------------------------------------------------------------------------------------
    def prune(self) -> None:
        """Rank 0 (not collective). Keep the newest `keep` checkpoints and, even when those are all damaged,
        the newest one that looks intact (manifest sizes; checksums are for resuming); delete only complete
        checkpoints older than every kept one, and the .tmp leftovers of crashed saves older than the
        newest complete checkpoint."""
        done = complete_checkpoints(self.root)
        self.remove_stale_tmp(done)
        if self.keep <= 0 or len(done) <= self.keep:
            return
        oldest_kept = len(done) - self.keep
        newest_good = next((i for i in reversed(range(len(done))) if looks_intact(done[i])), None)
        if newest_good is not None:
            oldest_kept = min(oldest_kept, newest_good)
        for old in done[:oldest_kept]:
            shutil.rmtree(old, ignore_errors=True)

    def remove_stale_tmp(self, done: list[Path]) -> None:
        """step_<M>.tmp older than the newest complete checkpoint: a crashed save no resume will finish
        (a newer one may be a save still to be redone at step M, which starts by clearing it anyway)."""
        if not done:
            return
        newest = step_of(done[-1])
        for child in self.root.iterdir():
            match = TMP_DIR.match(child.name)
            if match and int(match.group(1)) < newest:
                shutil.rmtree(child, ignore_errors=True)
