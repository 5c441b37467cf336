"""A ppmoe checkpoint read on one process, whatever layout wrote it: which checkpoint a path means,
what model it holds (model.json, or for an older ppmoe's checkpoint the run's config.yaml), and its
full weights. DCP stores global tensors with their shards' offsets, so a checkpoint written at tp=2,
pp=2 or under FSDP loads into plain full tensors here; the optimizer state is never read."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from ..config import load_config
from ..data import TOKENIZER_FILE, read_meta
from ..errors import CheckpointError
from ..model.build import meta_model
from ..model.gpt import GPTShape
from ..model.record import ModelRecord, read_model_record
from ..storage.manifest import combine, share_finding
from ..train.checkpoint import CheckpointManager, newest_inside
from ..train.plan import build_stage_plan
from .single_process import one_process_dcp


@dataclass(frozen=True)
class CheckpointSource:
    """path: the step directory; record: what its weights are; tokenizer: its tokenizer.json, if known."""

    path: Path
    record: ModelRecord
    tokenizer: Path | None


def locate(path: str | Path) -> Path:
    """The checkpoint `path` means: itself, or the newest one inside a run or checkpoints directory."""
    path = Path(path)
    if (path / ".metadata").is_file():
        return path
    if not path.exists():
        raise CheckpointError(f"{path} does not exist: give a run directory or a checkpoint (<run>/checkpoints/step_<N>)")
    newest = newest_inside(path) if path.is_dir() else None
    if newest is None:
        raise CheckpointError(f"{path} holds no complete checkpoint: give a run directory with checkpoints/ or a "
                              f"step_<N> directory")
    return newest


def verified(path: Path) -> Path:
    """`path` if its files match its manifest (or it has none: an older ppmoe); CheckpointError otherwise."""
    verdict = combine([share_finding(path, 0, 1)])
    if not verdict.ok:
        raise CheckpointError(f"checkpoint {path} is damaged ({verdict.reason}): use an older checkpoint of the run")
    return path


def describe_from_run(path: Path, config: Path | None) -> tuple[ModelRecord, Path | None]:
    """The record of a checkpoint written before checkpoints carried model.json: from the run's config
    (config.yaml of the run directory above checkpoints/, or `config`), its dataset and the stage the
    checkpoint's trainer state names."""
    config = config or path.parent.parent / "config.yaml"
    if not config.is_file():
        raise CheckpointError(f"{path} has no model.json (an older ppmoe wrote it) and {config} does not exist: "
                              f"pass the run's config with --config")
    cfg = load_config(config)
    meta = read_meta(cfg.data.dataset_dir)
    plan = build_stage_plan(cfg, meta["vocab_size"])
    with one_process_dcp():
        state = CheckpointManager(path.parent, 0, 0).read_trainer_state(path, {"step": 0, "stage": -1})
    index = int(state["stage"])
    stage = plan.stages[index] if index >= 0 else plan.stage_for_step(max(int(state["step"]), 1))
    record = ModelRecord(stage.shape, cfg.model.vocab_size or meta["vocab_size"], meta.get("eos_id"), stage.name,
                         stage.patch_size)
    tokenizer = Path(cfg.data.dataset_dir) / TOKENIZER_FILE
    return record, tokenizer if tokenizer.is_file() else None


def open_checkpoint(path: str | Path, config: str | Path | None = None) -> CheckpointSource:
    """The checkpoint `path` means, verified, with what it holds."""
    step_dir = verified(locate(path))
    record = read_model_record(step_dir)
    if record is not None:
        tokenizer = step_dir / TOKENIZER_FILE
        return CheckpointSource(step_dir, record, tokenizer if tokenizer.is_file() else None)
    record, tokenizer = describe_from_run(step_dir, Path(config) if config else None)
    return CheckpointSource(step_dir, record, tokenizer)


def read_model_state(path: Path, shape: GPTShape) -> dict[str, torch.Tensor]:
    """Full fp32 tensors of every model weight in checkpoint `path` (tied embeddings: one tensor under both
    names). Holds the whole model in this process's memory."""
    template = meta_model(shape).state_dict()
    stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    state = {key: torch.empty(t.shape, dtype=torch.float32) for key, t in template.items()
             if f"model.{key}" in stored}
    missing = set(template) - set(state) - ({"output.weight"} if shape.tie_embeddings else set())
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {sorted(missing)[:3]} of the model its model.json describes")
    with one_process_dcp():
        dcp.load({"model": state}, checkpoint_id=str(path), no_dist=True)
    if shape.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    return state
