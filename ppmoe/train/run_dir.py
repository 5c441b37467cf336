"""A run directory belongs to one run at a time, and a new run never silently continues or destroys an
old one.

- A lock file (output_dir/.lock: host, pid, start time; refreshed every step) makes a second run in the
  same directory fail at once. A lock whose process is gone (same host), or that nobody refreshed for
  STALE_AFTER_S (another host, which cannot be asked), is stale and replaced, with a message.
- `train.resume: none` in a directory that holds checkpoints is refused: the new run's checkpoints would
  be pruned against the old ones and a later `resume: auto` would continue the old run. Choose another
  output_dir, or delete the old checkpoints yourself (nothing is deleted for you).
- A resume whose config differs from the run's recorded config.yaml in what the checkpoints hold (the
  model's shape, the batch, the seed, the stage plan) is refused, naming the keys. config.yaml is
  written only after these checks, so a refused start never overwrites the record.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable

import torch.distributed as dist
import yaml

from ..config import ExperimentConfig, to_dict
from ..errors import RunDirError

LOCK_FILE = ".lock"
STALE_AFTER_S = 600.0
# What a checkpoint holds or its data order depends on: these may not change when a run resumes. The
# layout (parallel.*), the learning rate and train.steps may (checkpoints reshard; a run can be extended).
RESUME_KEYS = (
    "model.n_layers", "model.d_model", "model.n_heads", "model.n_kv_heads", "model.ffn_hidden", "model.vocab_size",
    "model.vocab_multiple", "model.rope_theta", "model.norm_eps", "model.tie_embeddings",
    "moe.num_experts", "moe.top_k", "moe.every", "moe.expert_hidden", "moe.shared_expert_hidden",
    "moe.normalize_topk", "train.global_batch_size", "train.seq_len", "train.seed", "patch.size",
    "patch.fraction", "growth.stages", "growth.split", "growth.ops",
)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


class RunDirLock:
    """output_dir/.lock, taken by rank 0 for the whole run (collective: every rank learns the outcome)."""

    def __init__(self, run_dir: Path, rank: int):
        self.path = Path(run_dir) / LOCK_FILE
        self.rank, self.held = rank, False
        self.owner = {"host": socket.gethostname(), "pid": os.getpid()}

    def acquire(self, log: Callable[[str], None]) -> None:
        """Take the lock or raise RunDirError on every rank."""
        verdict = [self._try(log) if self.rank == 0 else None]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(verdict, src=0)
        if verdict[0]:
            raise RunDirError(verdict[0])
        atexit.register(self.release)

    def _try(self, log: Callable[[str], None]) -> str | None:
        """None when taken, else why not."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                holder, age = self._read()
                if {k: holder.get(k) for k in self.owner} == self.owner:
                    self.held = True  # this process already holds it (a second Trainer in one process)
                    return None
                reason = self._stale(holder, age)
                if reason is None:
                    return (f"{self.path.parent} is in use by another run (pid {holder.get('pid')} on "
                            f"{holder.get('host')}, started {holder.get('started', '?')}, last alive {age:.0f} s "
                            f"ago): wait for it to end or use another output_dir; if no run is using it, "
                            f"delete {self.path}")
                log(f"removing a stale lock of {self.path.parent}: {reason}")
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({**self.owner, "started": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
            self.held = True
            return None
        return f"could not take the lock {self.path}: another run took it at the same moment"

    def _read(self) -> tuple[dict[str, Any], float]:
        try:
            age = time.time() - self.path.stat().st_mtime
            return json.loads(self.path.read_text() or "{}"), age
        except (OSError, ValueError):
            return {}, 0.0  # being written this instant, or unreadable: treated as held unless old

    def _stale(self, holder: dict[str, Any], age: float) -> str | None:
        if holder.get("host") == self.owner["host"] and isinstance(holder.get("pid"), int) \
                and not pid_alive(holder["pid"]):
            return f"its process {holder['pid']} on this host is gone"
        if age > STALE_AFTER_S:
            return f"nobody refreshed it for {age:.0f} s (more than {STALE_AFTER_S:.0f} s)"
        return None

    def refresh(self) -> None:
        """Show that the run is alive (rank 0, every step: one utime)."""
        if self.held:
            os.utime(self.path)

    def release(self) -> None:
        if self.held:
            holder, _ = self._read()
            if {k: holder.get(k) for k in self.owner} == self.owner:
                self.path.unlink(missing_ok=True)
            self.held = False


def refuse_fresh_start_over_checkpoints(newest: Path | None, run_dir: Path) -> None:
    """train.resume=none where checkpoints of another run exist."""
    if newest is not None:
        raise RunDirError(
            f"{run_dir} holds checkpoints of an earlier run (newest {newest.name}) and train.resume is 'none': "
            f"a new run here would mix its checkpoints with them. Continue the old run with train.resume=auto, "
            f"start the new one in another output_dir, or delete {newest.parent} first")


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: leaf} of nested dicts and lists (lists indexed like growth.stages.0.share)."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list):
        items = ((str(i), v) for i, v in enumerate(tree))
    else:
        return {prefix.rstrip("."): tree}
    out = {}
    for key, value in items:
        out.update(flatten(value, f"{prefix}{key}."))
    if not out:
        out[prefix.rstrip(".")] = tree  # an empty dict or list is a value of its own
    return out


def resume_changes(recorded: dict, cfg: ExperimentConfig) -> list[str]:
    """'key: recorded -> now' for every key of RESUME_KEYS (or under it) that differs."""
    old, new = flatten(recorded), flatten(to_dict(cfg))
    changed = []
    for key in sorted(set(old) | set(new)):
        if any(key == k or key.startswith(f"{k}.") for k in RESUME_KEYS) and old.get(key) != new.get(key):
            changed.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
    return changed


def check_resume_config(run_dir: Path, cfg: ExperimentConfig, checkpoint: Path) -> None:
    """Refuse to resume `checkpoint` with a config that no longer describes what it holds."""
    recorded_path = Path(run_dir) / "config.yaml"
    if not recorded_path.is_file():
        return  # nothing recorded (a checkpoint copied in by hand): the load itself checks shapes
    changed = resume_changes(yaml.safe_load(recorded_path.read_text()) or {}, cfg)
    if changed:
        raise RunDirError(
            f"resuming {checkpoint} with a config that differs from the one the run was trained with "
            f"({recorded_path}) in what its checkpoints hold: {'; '.join(changed)}. Resume with the recorded "
            f"values, or start a new run in another output_dir")
