"""Start-up checks of the prepared dataset and of the output directory, run before any model is built.

Without them a damaged or unsuitable input shows up late and badly: a raw json or numpy traceback
when the loaders open meta.json or map a shard; an IndexError in the embedding when the tokenizer has
more tokens than the model's vocabulary (and, at parallel.tp > 1, no error at all: the vocab-parallel
loss trains on the out-of-range targets to the end); a validation split too short for one sample,
found at the first validation, hours in and before that step's checkpoint; a disk too full or not
writable, found at the first checkpoint. Each check raises a DataError or RunDirError (ppmoe.errors)
naming the file or config key and the fix; the command line prints it as one line.

Call order in the trainer: `check_dataset(cfg.data.dataset_dir, padded_model_vocab(cfg),
stage_windows(cfg), needs_val=...)`, then `check_output_dir(cfg.output_dir, checkpoint_bytes(params))`,
both before the run directory is created or anything is written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from ppmoe.config import ExperimentConfig, padded_vocab_size
from ppmoe.data.loader import META_FILE, SPLITS
from ppmoe.data.prepare import TOKENIZER_FILE
from ppmoe.errors import DataError, RunDirError

REPREPARE = "re-run `python -m ppmoe prepare CONFIG --overwrite`"

# Scanning every token id costs one read of the whole dataset: numpy's max over a memory-mapped uint16
# shard runs at about 14 GB/s from the page cache (measured on this 2-core machine), but at disk or
# network speed when cold. A 10B-token corpus is 20 GB at uint16: ~1.5 s warm, 10-20 s from a local
# NVMe disk, minutes from a network file system, on every rank and every restart, and it evicts the
# page cache. So datasets up to FULL_SCAN_BYTES are scanned completely and larger ones are sampled:
# SAMPLE_BLOCKS evenly spaced blocks of SAMPLE_TOKENS tokens per shard (128 KiB a uint16 shard, about
# 80 MB for 10B tokens in the default 16M-token shards). Sampling catches shards written with another
# tokenizer (large ids everywhere), not a single corrupted token.
FULL_SCAN_BYTES = 4 << 30
SAMPLE_BLOCKS = 4
SAMPLE_TOKENS = 16_384

# Fields of meta.json that the loaders and the trainer read, and what each must be.
META_FIELDS = {
    "vocab_size": "a positive integer (tokens in the tokenizer)",
    "dtype": "the name of an unsigned integer numpy dtype (uint16 or uint32)",
    "shards": "a mapping of split (train, val) to a list of shard file names",
    "tokens": "a mapping of split (train, val) to its number of tokens",
}

# A checkpoint holds, per parameter, the fp32 weight (4 bytes) and AdamW's two fp32 moments (8 bytes).
CHECKPOINT_BYTES_PER_PARAM = 4 + 8
# Margin on top: DCP metadata and per-rank files, rng states, the trainer state, config.yaml and
# metrics.jsonl (small and fixed), plus 5% for file-system block overhead.
CHECKPOINT_MARGIN_BYTES = 64 << 20
CHECKPOINT_MARGIN_FRACTION = 0.05


# ---- the dataset ----------------------------------------------------------------------------------

def check_dataset(dataset_dir: str | Path, model_vocab_size: int | None, windows: list[tuple[int, int]],
                  needs_val: bool = True, scan_token_ids: bool = True) -> list[str]:
    """Check that the prepared dataset in `dataset_dir` can be trained on as configured.

    `model_vocab_size`: the model's padded vocabulary (embedding rows); None when it is taken from the
    dataset (model.vocab_size: null). `windows`: (window_len, global_batch_size) of each stage, where
    window_len is the tokens the loader reads per sample (train.seq_len + 1 at token level, patch_size *
    (seq_len + 1) in a patch stage; ppmoe.train.plan.stage_windows(cfg) gives them). `needs_val`: whether
    the run reads the val split (train.val_every > 0, or more than one stage: the growth probe scores val batches).

    Fatal (DataError), because a loader or the model would fail on it, or silently train wrong:
    - the directory or meta.json missing; meta.json not JSON, or a field of META_FIELDS missing or of
      the wrong type (read_meta and TokenStream index them);
    - a listed shard missing, empty, not a whole number of tokens of the dtype, or a split's shards
      holding another token count than meta.json says (np.memmap raises on empty and odd-sized files,
      TokenStream on the count: for the val split only at the first validation);
    - tokenizer.json present but unreadable, or the tokenizer's vocabulary (the larger of meta.json's
      vocab_size and tokenizer.json's size) larger than the model's (an IndexError in the embedding
      at tp=1, out-of-range targets trained on silently at tp>1);
    - with scan_token_ids, a token id >= meta.json's vocab_size in a shard (see FULL_SCAN_BYTES);
    - the train split shorter than the longest window (BatchLoader needs one sample of seq_len + 1
      tokens, ChunkedLoader one chunk of the longest stage's window);
    - when needs_val, the val split shorter than the longest window: iter_eval_batches wraps around a
      short split, so one sample is all it needs, but with none it raises at the first validation.
    Not fatal, returned as notes for the log: a val split with fewer distinct samples than one
    validation batch (the wrapped batches score the same samples again, so the validation loss rests
    on fewer tokens), and a train split with fewer samples than one global batch (a batch repeats
    samples). Reads only; writes nothing.
    """
    directory = Path(dataset_dir)
    meta = read_checked_meta(directory)
    tokens = {split: check_shards(directory, meta, split) for split in SPLITS}
    check_vocabulary(directory, meta, model_vocab_size)
    notes = check_split_sizes(directory, tokens, windows, needs_val)
    if scan_token_ids:
        check_token_ids(directory, meta)
    return notes


def read_checked_meta(directory: Path) -> dict:
    """meta.json of `directory`, with every field the loaders read present and of the right type."""
    path = directory / META_FILE
    if not directory.is_dir():
        raise DataError(f"no prepared dataset: {directory} does not exist (data.dataset_dir); run "
                        f"`python -m ppmoe prepare CONFIG` first")
    if not path.is_file():
        raise DataError(f"{directory} holds no {META_FILE}: it is not a prepared dataset, or its preparation "
                        f"did not finish (data.dataset_dir); {REPREPARE}")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e}): the dataset is damaged; {REPREPARE}") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path} must hold a JSON object, got {type(meta).__name__}: the dataset is damaged; "
                        f"{REPREPARE}")
    for field, wanted in META_FIELDS.items():
        if field not in meta:
            raise DataError(f"{path} has no field {field!r} ({wanted}): the dataset is damaged or was "
                            f"prepared by another tool; {REPREPARE}")
        if not meta_field_is_valid(field, meta[field]):
            raise DataError(f"{path}: field {field!r} must be {wanted}, got {meta[field]!r}: the dataset is "
                            f"damaged; {REPREPARE}")
    return meta


def meta_field_is_valid(field: str, value: object) -> bool:
    """Whether meta.json's `field` holds what META_FIELDS says."""
    if field == "vocab_size":
        return is_count(value) and value >= 1
    if field == "dtype":
        try:
            return isinstance(value, str) and np.dtype(value).kind == "u"
        except (TypeError, ValueError):
            return False
    per_split = value if isinstance(value, dict) else {}
    if any(split not in per_split for split in SPLITS):
        return False
    if field == "shards":
        return all(isinstance(names, list) and all(isinstance(n, str) and n for n in names)
                   for names in (per_split[s] for s in SPLITS))
    return all(is_count(per_split[s]) and per_split[s] >= 0 for s in SPLITS)  # tokens


def is_count(value: object) -> bool:
    """An int that is not a bool (JSON true would otherwise pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_shards(directory: Path, meta: dict, split: str) -> int:
    """Check the files of `split` against meta.json; return the split's number of tokens."""
    itemsize = np.dtype(meta["dtype"]).itemsize
    total = 0
    for name in meta["shards"][split]:
        path = directory / name
        if not path.is_file():
            raise DataError(f"shard {path} (listed in {directory / META_FILE}) is missing: the dataset is "
                            f"damaged; {REPREPARE}")
        size = path.stat().st_size
        if size == 0 or size % itemsize:
            what = "is empty" if size == 0 else f"is {size} bytes, not a whole number of {meta['dtype']} tokens"
            raise DataError(f"shard {path} {what} ({itemsize} bytes each): it is truncated or damaged; "
                            f"{REPREPARE}")
        total += size // itemsize
    if total != meta["tokens"][split]:
        raise DataError(f"the {split} shards of {directory} hold {total} tokens, but {directory / META_FILE} "
                        f"says {meta['tokens'][split]}: a shard is truncated or was replaced; {REPREPARE}")
    return total


def check_vocabulary(directory: Path, meta: dict, model_vocab_size: int | None) -> None:
    """The tokenizer's vocabulary must fit in the model's (see check_dataset)."""
    tokenizer_size = read_tokenizer_size(directory)
    needed = max(meta["vocab_size"], tokenizer_size or 0)
    if model_vocab_size is None:
        if needed > meta["vocab_size"]:  # the model takes meta.json's vocab_size, the ids come from tokenizer.json
            raise DataError(f"{directory / TOKENIZER_FILE} has {tokenizer_size} tokens but "
                            f"{directory / META_FILE} says vocab_size={meta['vocab_size']}: the dataset is "
                            f"inconsistent; {REPREPARE}")
        return
    if needed > model_vocab_size:
        raise DataError(
            f"model.vocab_size: the model's vocabulary of {model_vocab_size} entries (model.vocab_size padded "
            f"up to a multiple of model.vocab_multiple) is smaller than the tokenizer's {needed} tokens "
            f"({directory}): set model.vocab_size to at least {needed}, or null to use the dataset's"
        )


def read_tokenizer_size(directory: Path) -> int | None:
    """The vocabulary size of the dataset's tokenizer.json (added tokens included); None without one."""
    path = directory / TOKENIZER_FILE
    if not path.is_file():
        return None
    try:
        return Tokenizer.from_file(str(path)).get_vocab_size()
    except Exception as e:  # tokenizers raises its own exception types for a damaged file
        raise DataError(f"{path} cannot be read as a tokenizer ({e}): the dataset is damaged; {REPREPARE}") from None


def check_split_sizes(directory: Path, tokens: dict[str, int], windows: list[tuple[int, int]],
                      needs_val: bool) -> list[str]:
    """Fatal when a split read by the run is shorter than one sample; notes when shorter than a batch."""
    if not windows:
        return []
    longest = max(length for length, _ in windows)
    splits = ("train", "val") if needs_val else ("train",)
    for split in splits:
        if tokens[split] < longest:
            raise DataError(
                f"the {split} split of {directory} has {tokens[split]} tokens, fewer than one sample of "
                f"{longest} tokens (train.seq_len + 1, times the patch size in a patch stage): "
                + ("use a larger data.val_fraction (data.val_documents when streaming) and "
                   if split == "val" else "prepare more documents and ")
                + "re-prepare with `python -m ppmoe prepare CONFIG --overwrite`, or lower train.seq_len"
            )
    return [note for split in splits for note in batch_notes(directory, split, tokens[split], windows)]


def batch_notes(directory: Path, split: str, tokens: int, windows: list[tuple[int, int]]) -> list[str]:
    """Notes for windows whose batch holds more samples than the split has (samples overlap by one token,
    as in the loaders: (tokens - 1) // (window_len - 1) of them)."""
    if split == "val":
        effect = "validation scores them more than once, so its loss rests on fewer tokens; a larger " \
                 "data.val_fraction (and re-preparing) avoids it"
    else:
        effect = "a step repeats samples; more data or a smaller train.global_batch_size avoids it"
    notes = []
    for length, batch in sorted(set(windows)):
        samples = (tokens - 1) // max(length - 1, 1)
        if samples < batch:
            notes.append(f"note: the {split} split of {directory} has {samples} samples of {length} tokens, fewer "
                         f"than one batch of {batch}: {effect}")
    return notes


def check_token_ids(directory: Path, meta: dict) -> None:
    """No token id in the shards may reach meta.json's vocab_size (which the model's vocabulary covers,
    check_vocabulary made sure). Complete up to FULL_SCAN_BYTES of shards, sampled above."""
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")  # shards are little-endian on disk
    names = [name for split in SPLITS for name in meta["shards"][split]]
    complete = sum((directory / name).stat().st_size for name in names) <= FULL_SCAN_BYTES
    for name in names:
        path = directory / name
        largest = largest_token_id(np.memmap(path, dtype=dtype, mode="r"), complete)
        if largest >= meta["vocab_size"]:
            raise DataError(f"shard {path} holds token id {largest}, but {directory / META_FILE} says the tokenizer "
                            f"has {meta['vocab_size']} tokens: the shards come from another tokenizer or are "
                            f"damaged; {REPREPARE}")


def largest_token_id(shard: np.ndarray, complete: bool) -> int:
    """The largest id in `shard`, or in SAMPLE_BLOCKS evenly spaced blocks of it when not `complete`."""
    if complete or len(shard) <= SAMPLE_BLOCKS * SAMPLE_TOKENS:
        return int(shard.max())
    starts = np.linspace(0, len(shard) - SAMPLE_TOKENS, SAMPLE_BLOCKS).astype(np.int64)
    return max(int(shard[start : start + SAMPLE_TOKENS].max()) for start in starts)


# ---- what the run reads, from its config ----------------------------------------------------------

def padded_model_vocab(cfg: ExperimentConfig) -> int | None:
    """The model's embedding rows when model.vocab_size is set (padded up to model.vocab_multiple, as
    ppmoe.model.model_shape does; the same at every tp); None when it comes from the dataset."""
    if cfg.model.vocab_size is None:
        return None
    return padded_vocab_size(cfg.model.vocab_size, cfg.model.vocab_multiple)


# ---- the output directory -------------------------------------------------------------------------

def checkpoint_bytes(num_params: int, checkpoints: int = 1) -> int:
    """Disk space for `checkpoints` checkpoints of a model of `num_params` parameters: 12 bytes a
    parameter (fp32 weight 4 + AdamW's two fp32 moments 8) each, plus 5% and 64 MiB for DCP metadata,
    rng and trainer state, config and metrics. A save writes the new checkpoint before pruning to
    checkpoint.keep, so a run keeping K needs K + 1 at its peak; a growth boundary also writes the
    grown checkpoint (count the largest stage's parameters)."""
    payload = num_params * CHECKPOINT_BYTES_PER_PARAM * checkpoints
    return int(payload * (1 + CHECKPOINT_MARGIN_FRACTION)) + CHECKPOINT_MARGIN_BYTES


def check_output_dir(path: str | Path, needed_bytes: int, key: str = "output_dir") -> None:
    """The directory `path` (config key `key`), or the nearest existing parent it would be created in,
    must be a writable directory on a file system with at least `needed_bytes` free. Raises RunDirError;
    creates nothing (a probe file is created and deleted again)."""
    target = Path(path).absolute()
    existing = nearest_existing(target)
    if not existing.is_dir():
        raise RunDirError(f"{key}={path} cannot be created: {existing} is a file, not a directory; choose "
                          f"another {key}")
    probe_write(existing, path, key)
    free = shutil.disk_usage(existing).free
    if free < needed_bytes:
        raise RunDirError(f"{key}={path}: the file system of {existing} has {format_bytes(free)} free, but the run "
                          f"needs about {format_bytes(needed_bytes)} for its checkpoints; free some space, lower "
                          f"checkpoint.keep, or choose another {key}")


def nearest_existing(path: Path) -> Path:
    """`path` if it exists, else its closest existing ancestor."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def probe_write(directory: Path, path: str | Path, key: str) -> None:
    """Create and delete a file in `directory`: permission bits alone do not tell (root, ACLs, read-only
    mounts)."""
    try:
        handle, name = tempfile.mkstemp(prefix=".ppmoe-write-check-", dir=directory)
        os.close(handle)
        os.unlink(name)
    except OSError as e:
        where = "" if directory == Path(path).absolute() else f" (the nearest existing directory of {path})"
        raise RunDirError(f"{key}={path}: cannot write to {directory}{where}: {e.strerror or e}; choose a "
                          f"writable {key} or fix its permissions") from None


def format_bytes(count: int) -> str:
    """1536 -> '1.5 KiB' (bytes below 1 KiB as a whole number)."""
    if count < 1024:
        return f"{count} B"
    value = count / 1024
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{value:.1f} {unit}"
