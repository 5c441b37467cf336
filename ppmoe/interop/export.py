"""`ppmoe export`: a ppmoe checkpoint -> a transformers model directory (config.json, model.safetensors
(sharded when large), generation_config.json, tokenizer.json + tokenizer_config.json), loadable offline
with AutoModelForCausalLM / AutoTokenizer, and by tools that read that format (lm-eval-harness, vLLM)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .architectures import ExportRefused, choose_architecture, hf_config
from .checkpoint_source import CheckpointSource, read_model_state
from .output_dir import fresh_directory
from .safetensors_files import DEFAULT_MAX_SHARD_BYTES, write_safetensors
from .tokenizer_files import write_hf_tokenizer
from .weights import to_hf


@dataclass(frozen=True)
class ExportReport:
    out: Path
    architecture: str
    parameters: int  # as written (padding rows dropped)
    files: list[Path]
    notes: list[str]


def export_notes(source: CheckpointSource) -> list[str]:
    """What the user should know about an export that is exact but may not be what they expect."""
    record, notes = source.record, []
    if record.patch_size > 1:
        notes.append(f"the checkpoint is from stage {record.stage!r}, trained to read patches of {record.patch_size} "
                     f"tokens; transformers feeds it single tokens (export a checkpoint of a token stage to "
                     f"evaluate the finished model)")
    moe = record.shape.moe
    if moe is not None and moe.capacity_factor is not None:
        notes.append(f"moe.capacity_factor={moe.capacity_factor} dropped tokens over capacity; transformers' MoE "
                     f"is dropless, so outputs equal ppmoe's where no token was dropped")
    return notes


def export_checkpoint(source: CheckpointSource, out: Path, arch: str = "auto", tokenizer: Path | None = None,
                      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, log: Callable[[str], None] = print,
                      overwrite: bool = False) -> ExportReport:
    """Write `source` as a transformers model into the new directory `out`. ExportRefused when no
    architecture represents the model exactly, or when there is no tokenizer to write."""
    record = source.record
    architecture = choose_architecture(record.shape, arch)
    tokenizer = tokenizer or source.tokenizer
    if tokenizer is None or not Path(tokenizer).is_file():
        raise ExportRefused(f"no tokenizer.json for {source.path} (checkpoints of an older ppmoe do not hold one): "
                            f"pass --tokenizer <dataset_dir>/tokenizer.json")
    notes = export_notes(source)
    for note in notes:
        log(f"note: {note}")
    tensors = to_hf(read_model_state(source.path, record.shape), record.shape, architecture, record.vocab_size)
    with fresh_directory(out, overwrite=overwrite) as tmp:
        files = write_safetensors(tensors, tmp, max_shard_bytes)
        config = hf_config(architecture, record.shape, record.vocab_size, record.eos_id)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        generation = {"eos_token_id": record.eos_id, "pad_token_id": record.eos_id, "bos_token_id": None}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        write_hf_tokenizer(Path(tokenizer), tmp, record.eos_id, record.shape.max_seq_len)
    parameters = sum(t.numel() for t in tensors.values())
    return ExportReport(out, architecture, parameters, [out / f.name for f in files], notes)
