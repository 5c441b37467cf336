"""Writing and reading a transformers weights directory: model.safetensors, or shards
model-0000K-of-0000N.safetensors with model.safetensors.index.json (the name -> file map)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30  # transformers' default (5 GB)


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def plan_shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    """Names in order, cut into groups of at most `max_bytes` (a larger single tensor gets its own)."""
    shards, current, size = [], [], 0
    for name, t in tensors.items():
        if current and size + tensor_bytes(t) > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += tensor_bytes(t)
    if current:
        shards.append(current)
    return shards


def write_safetensors(tensors: dict[str, torch.Tensor], out: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
                      ) -> list[Path]:
    """Write `tensors` into `out` (one file, or shards plus the index); returns the files written."""
    shards = plan_shards(tensors, max_shard_bytes)
    metadata = {"format": "pt"}
    if len(shards) == 1:
        path = out / SINGLE_FILE
        save_file(tensors, str(path), metadata=metadata)
        return [path]
    files, weight_map = [], {}
    for k, names in enumerate(shards, start=1):
        path = out / f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file({name: tensors[name] for name in names}, str(path), metadata=metadata)
        weight_map.update({name: path.name for name in names})
        files.append(path)
    index = {"metadata": {"total_size": sum(tensor_bytes(t) for t in tensors.values())}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return files + [out / INDEX_FILE]


def read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a transformers weights directory (single file or sharded)."""
    index = directory / INDEX_FILE
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (directory / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    else:
        raise FileNotFoundError(f"{directory} has no {SINGLE_FILE} or {INDEX_FILE}: point at a transformers model "
                                f"directory saved with safetensors (save_pretrained's default)")
    tensors = {}
    for name in files:
        with safe_open(str(directory / name), framework="pt") as f:
            tensors.update({key: f.get_tensor(key) for key in f.keys()})
    return tensors
