"""`ppmoe prepare`: documents -> tokenizer -> memory-mappable token shards + meta.json.

Layout of a prepared dataset directory:
    meta.json          vocab_size, dtype, eos_id, tokens/shards/documents per split, source
    tokenizer.json     the `tokenizers` tokenizer the ids come from
    train_00000.bin    raw little-endian uint16 (or uint32) token ids, at most shard_tokens each
    val_00000.bin      ...
Each split is the concatenation of its documents' ids, each document followed by EOS.

Everything is written into a hidden temporary directory next to dataset_dir and renamed into place
at the end, with meta.json written last: a directory with meta.json is always complete, and an
interrupted run leaves only a `.NAME.tmp-*` directory that nothing reads.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from ppmoe.config.schema import DataConfig
from ppmoe.data.loader import META_FILE, SPLITS, read_meta
from ppmoe.data.sources import describe_source, iter_documents
from ppmoe.data.tokenizer import eos_id, load_tokenizer, train_bpe

TOKENIZER_FILE = "tokenizer.json"
_ENCODE_CHUNK_DOCS = 512  # documents per encode_batch call: enough to keep all cores busy


def prepare_dataset(cfg: DataConfig, log: Callable[[str], object] = print, overwrite: bool = False) -> dict:
    """Build the dataset described by `cfg` in `cfg.dataset_dir`; return its meta dict.

    An existing complete dataset is returned untouched unless `overwrite` is set. Empty documents
    are skipped (they would only add a lone EOS).
    """
    out = Path(cfg.dataset_dir)
    if (out / META_FILE).is_file() and not overwrite:
        log(f"{out} already holds a prepared dataset; using it as is (overwrite to rebuild)")
        return read_meta(out)
    if out.is_dir() and not (out / META_FILE).exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{out} exists, is not empty and holds no meta.json, so it is not a prepared dataset; "
            "refusing to replace it (choose another data.dataset_dir, or delete it, or overwrite)"
        )
    cfg.check("data.")  # the data section's own rules, so `prepare` and `train` refuse the same configs alike
    _warn_leftovers(out, log)
    t0 = time.perf_counter()

    if cfg.streaming:
        return _prepare_streaming(cfg, out, log, overwrite, t0)
    docs = [d for d in iter_documents(cfg) if d]
    if len(docs) < 2:
        raise ValueError(
            f"{describe_source(cfg)} gave {len(docs)} non-empty document(s); at least 2 are needed "
            "(one for training, one for validation)"
        )
    n_val = _num_val_docs(len(docs), cfg.val_fraction)
    splits = {"train": docs[:-n_val], "val": docs[-n_val:]}
    log(f"read {len(docs)} documents ({sum(map(len, docs)):,} characters) from {describe_source(cfg)}")

    if cfg.tokenizer:
        tok = load_tokenizer(cfg.tokenizer)
        log(f"loaded tokenizer {cfg.tokenizer} (vocab {tok.get_vocab_size()})")
    else:
        # Trained on the train split only, so nothing about the validation text leaks into it.
        tok = train_bpe(splits["train"], cfg.vocab_size)
        log(f"trained byte-level BPE: vocab {tok.get_vocab_size()} (asked for {cfg.vocab_size})")
    vocab_size = tok.get_vocab_size()
    dtype = np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)
    eos = eos_id(tok)

    tmp = _new_tmp_dir(out)
    try:
        shards, tokens = {}, {}
        for split in SPLITS:
            writer = ShardWriter(tmp, split, cfg.shard_tokens, dtype)
            _encode_into(tok, splits[split], eos, writer)
            shards[split], tokens[split] = writer.close(), writer.total
        meta = _finish(cfg, tok, tmp, out, shards, tokens, {s: len(splits[s]) for s in SPLITS},
                       {s: sum(map(len, splits[s])) for s in SPLITS}, t0, overwrite, log)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(
        f"prepared {out}: {len(docs)} docs ({len(splits['train'])} train / {n_val} val), "
        f"{tokens['train']:,} train + {tokens['val']:,} val tokens in "
        f"{len(shards['train'])} + {len(shards['val'])} shards, vocab {tok.get_vocab_size()}, "
        f"{meta['prepare_seconds']:.1f}s"
    )
    return meta


def _prepare_streaming(cfg: DataConfig, out: Path, log: Callable[[str], object], overwrite: bool, t0: float) -> dict:
    """One pass, bounded memory: validation documents first, then a tokenizer sample, then the rest."""
    docs = (d for d in iter_documents(cfg) if d)
    val_docs = list(itertools.islice(docs, cfg.val_documents))
    head = list(itertools.islice(docs, cfg.tokenizer_documents))
    if not val_docs or not head:
        raise ValueError(f"{describe_source(cfg)} gave too few documents for data.val_documents="
                         f"{cfg.val_documents} plus at least one training document")
    tok = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else train_bpe(head, cfg.vocab_size)
    log(f"streaming {describe_source(cfg)}: {len(val_docs)} validation documents; tokenizer "
        f"{'loaded' if cfg.tokenizer else f'trained on {len(head)} documents'} (vocab {tok.get_vocab_size()})")
    dtype = np.dtype(np.uint16 if tok.get_vocab_size() <= 2**16 else np.uint32)
    tmp = _new_tmp_dir(out)
    try:
        shards, tokens, counts, chars = {}, {}, {}, {}
        for split, stream in (("val", val_docs), ("train", itertools.chain(head, docs))):
            writer = ShardWriter(tmp, split, cfg.shard_tokens, dtype)
            counts[split], chars[split] = _encode_into(tok, stream, eos_id(tok), writer)
            shards[split], tokens[split] = writer.close(), writer.total
        meta = _finish(cfg, tok, tmp, out, shards, tokens, counts, chars, t0, overwrite, log)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"prepared {out} (streaming): {counts['train']:,} train / {counts['val']:,} val docs, "
        f"{tokens['train']:,} + {tokens['val']:,} tokens, {meta['prepare_seconds']:.1f}s")
    return meta


def _new_tmp_dir(out: Path) -> Path:
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    return tmp


def _finish(cfg: DataConfig, tok, tmp: Path, out: Path, shards: dict, tokens: dict, documents: dict,
            characters: dict, t0: float, overwrite: bool, log: Callable[[str], object]) -> dict:
    """Write tokenizer.json and meta.json (last) into `tmp`, then move it into place atomically."""
    vocab_size = tok.get_vocab_size()
    tok.save(str(tmp / TOKENIZER_FILE))
    meta = {
        "format_version": 1,
        "vocab_size": vocab_size,
        "dtype": np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32).name,
        "eos_id": eos_id(tok),
        "tokens": tokens,
        "shards": shards,
        "num_documents": sum(documents.values()),
        "documents": documents,
        "characters": characters,
        "shard_tokens": cfg.shard_tokens,
        "source": describe_source(cfg),
        "tokenizer": cfg.tokenizer or f"byte-level BPE trained on the train split (vocab_size={cfg.vocab_size})",
        "prepare_seconds": round(time.perf_counter() - t0, 3),
    }
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    if (out / META_FILE).is_file() and not overwrite:
        # Another process finished the same dataset while we worked: keep theirs.
        shutil.rmtree(tmp)
        log(f"{out} was prepared by another process meanwhile; using it")
        return read_meta(out)
    _move_into_place(tmp, out)
    return meta


class ShardWriter:
    """Appends token ids to `{split}_00000.bin`, `{split}_00001.bin`, ... of at most `shard_tokens` each."""

    def __init__(self, directory: Path, split: str, shard_tokens: int, dtype: np.dtype):
        self.directory, self.split, self.shard_tokens, self.dtype = directory, split, shard_tokens, dtype
        self.names: list[str] = []
        self.total = 0  # tokens written so far
        self._file = None
        self._in_shard = 0  # tokens in the open shard

    def write(self, ids: np.ndarray) -> None:
        """Append a 1-D array of ids, starting new shards as the current one fills up."""
        ids = np.ascontiguousarray(ids, dtype=self.dtype.newbyteorder("<"))  # files are little-endian
        while len(ids):
            if self._file is None or self._in_shard == self.shard_tokens:
                self._open_next()
            n = min(len(ids), self.shard_tokens - self._in_shard)
            self._file.write(ids[:n].tobytes())
            self._in_shard += n
            self.total += n
            ids = ids[n:]

    def close(self) -> list[str]:
        """Finish the last shard; return the shard file names in order."""
        if self._file is not None:
            self._file.close()
            self._file = None
        return self.names

    def _open_next(self) -> None:
        self.close()
        name = f"{self.split}_{len(self.names):05d}.bin"
        self._file = open(self.directory / name, "wb")
        self.names.append(name)
        self._in_shard = 0


def _num_val_docs(n_docs: int, val_fraction: float) -> int:
    """The last max(1, round(val_fraction * n)) documents, but always leaving one for training."""
    return min(max(1, round(val_fraction * n_docs)), n_docs - 1)


def _encode_into(tok, docs: Iterable[str], eos: int, writer: ShardWriter) -> tuple[int, int]:
    """Encode `docs` in batches (parallel in Rust) and append ids + EOS per document to `writer`.
    Returns (documents, characters) written; `docs` is consumed once (it may be a stream)."""
    # A document containing the literal text "<|endoftext|>" must not turn into a real EOS (that
    # would split it in two and lose the text on decode), so special tokens are encoded as text.
    was = tok.encode_special_tokens
    tok.encode_special_tokens = True
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # _fast skips offsets we don't use
    n_docs = n_chars = 0
    docs = iter(docs)
    try:
        while chunk := list(itertools.islice(docs, _ENCODE_CHUNK_DOCS)):
            n_docs, n_chars = n_docs + len(chunk), n_chars + sum(map(len, chunk))
            encodings = encode(chunk, add_special_tokens=False)
            lengths = [len(e.ids) + 1 for e in encodings]
            ids = np.empty(sum(lengths), dtype=writer.dtype)
            ends = np.cumsum(lengths)
            ids[ends - 1] = eos
            for enc, end, n in zip(encodings, ends, lengths):
                ids[end - n : end - 1] = enc.ids
            writer.write(ids)
    finally:
        tok.encode_special_tokens = was
    return n_docs, n_chars


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename `tmp` to `out`, replacing an existing `out` (moved aside first, then deleted)."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


def _warn_leftovers(out: Path, log: Callable[[str], object]) -> None:
    leftovers = sorted(out.parent.glob(f".{out.name}.tmp-*")) if out.parent.is_dir() else []
    if leftovers:
        log(
            f"note: {len(leftovers)} temporary director{'y' if len(leftovers) == 1 else 'ies'} from "
            f"an interrupted or concurrent prepare: {', '.join(map(str, leftovers))} (ignored; delete when idle)"
        )
