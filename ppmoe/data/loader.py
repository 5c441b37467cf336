"""Reading a prepared dataset: memory-mapped token streams and the batches cut from them.

A *sample* is a window of seq_len + 1 tokens starting at a multiple of seq_len: its first seq_len
tokens are the inputs and its last seq_len the targets. Consecutive samples share one token, so
every token of the split (but the very first) is predicted once per epoch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

META_FILE = "meta.json"
SPLITS = ("train", "val")
_PREPARE_HINT = "run `python -m ppmoe prepare CONFIG` first"


def read_meta(dataset_dir: str | Path) -> dict:
    """The meta.json of a prepared dataset (see ppmoe.data.prepare for its fields)."""
    path = Path(dataset_dir) / META_FILE
    if not path.is_file():
        what = "does not exist" if not Path(dataset_dir).exists() else "holds no meta.json"
        raise FileNotFoundError(f"no prepared dataset: {dataset_dir} {what}; {_PREPARE_HINT}")
    return json.loads(path.read_text())


class TokenStream:
    """All tokens of one split as one long read-only array, backed by memory-mapped shard files."""

    def __init__(self, dataset_dir: str | Path, split: str):
        self.dataset_dir = Path(dataset_dir)
        self.split = split
        self.meta = read_meta(dataset_dir)
        if split not in self.meta["shards"]:
            raise KeyError(f"{dataset_dir} has no split {split!r}; it has {', '.join(self.meta['shards'])}")
        # Shards are little-endian on disk, whatever this machine's byte order.
        self.dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
        self._shards: list[np.memmap] = []
        for name in self.meta["shards"][split]:
            path = self.dataset_dir / name
            if not path.is_file():
                raise FileNotFoundError(f"shard {path} is missing; the dataset is damaged, {_PREPARE_HINT} again")
            self._shards.append(np.memmap(path, dtype=self.dtype, mode="r"))
        # _starts[i] is the index of shard i's first token in the stream; _starts[-1] the total.
        self._starts = np.concatenate([[0], np.cumsum([len(s) for s in self._shards])]).astype(np.int64)
        if self._starts[-1] != self.meta["tokens"][split]:
            raise ValueError(
                f"the {split} shards of {dataset_dir} hold {self._starts[-1]} tokens but meta.json says "
                f"{self.meta['tokens'][split]}; the dataset is damaged, {_PREPARE_HINT} again"
            )

    def __len__(self) -> int:
        return int(self._starts[-1])

    def window(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as a new array of shape [length] (any shard boundaries)."""
        end = start + length
        if start < 0 or length < 0 or end > len(self):
            raise IndexError(f"window [{start}, {end}) outside the {len(self)} tokens of split {self.split!r}")
        out = np.empty(length, dtype=self.dtype)
        shard = int(np.searchsorted(self._starts, start, side="right")) - 1
        pos = start
        while pos < end:
            lo = pos - self._starts[shard]
            n = min(end, self._starts[shard + 1]) - pos
            out[pos - start : pos - start + n] = self._shards[shard][lo : lo + n]
            pos += n
            shard += 1
        return out


def _num_samples(stream: TokenStream, seq_len: int) -> int:
    """How many seq_len + 1 windows start at multiples of seq_len inside the stream."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    n = (len(stream) - 1) // seq_len
    if n < 1:
        raise ValueError(
            f"the {stream.split} split of {stream.dataset_dir} has {len(stream)} tokens: too small for "
            f"seq_len={seq_len} (needs at least {seq_len + 1}); lower train.seq_len or prepare more data"
        )
    return n


def rank_slice(batch_size: int, dp_rank: int, dp_size: int) -> slice:
    """This rank's contiguous part of a global batch."""
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank must be in [0, {dp_size}), got {dp_rank}")
    if batch_size % dp_size:
        raise ValueError(f"batch size {batch_size} is not divisible by the data-parallel size {dp_size}")
    per_rank = batch_size // dp_size
    return slice(dp_rank * per_rank, (dp_rank + 1) * per_rank)


def _to_batch(stream: TokenStream, sample_ids: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples -> (inputs, targets), both int64 [len(sample_ids), seq_len]."""
    rows = np.stack([stream.window(int(i) * seq_len, seq_len + 1) for i in sample_ids]).astype(np.int64)
    rows = torch.from_numpy(rows)
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


class BatchLoader:
    """Shuffled training batches, the same sequence of global batches for any dp_size.

    Epoch e visits all samples in the order `default_rng([seed, e]).permutation(num_samples)`;
    batches run on across epoch ends. Rank r of dp_size gets rows [r*B/dp, (r+1)*B/dp) of each
    global batch of B = global_batch_size samples.
    """

    def __init__(
        self,
        dataset_dir: str | Path,
        split: str,
        seq_len: int,
        global_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
    ):
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        if global_batch_size < 1:
            raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
        self.stream = TokenStream(dataset_dir, split)
        self.seq_len, self.global_batch_size, self.seed = seq_len, global_batch_size, seed
        self.num_samples = _num_samples(self.stream, seq_len)
        self._rows = rank_slice(global_batch_size, dp_rank, dp_size)
        self.epoch = 0
        self.position = 0  # samples of the current epoch already handed out
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    @property
    def samples_seen(self) -> int:
        """Global samples handed out since the start (over all ranks and epochs)."""
        return self.epoch * self.num_samples + self.position

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), int64 [global_batch_size // dp_size, seq_len]; targets = inputs shifted by 1."""
        ids = np.empty(self.global_batch_size, dtype=np.int64)
        filled = 0
        while filled < self.global_batch_size:
            perm = self._permutation()
            n = min(self.global_batch_size - filled, self.num_samples - self.position)
            ids[filled : filled + n] = perm[self.position : self.position + n]
            filled += n
            self.position += n
            if self.position == self.num_samples:
                self.epoch, self.position = self.epoch + 1, 0
        return _to_batch(self.stream, ids[self._rows], self.seq_len)

    def continue_from(self, other: "BatchLoader") -> None:
        """Carry on where `other` (the previous stage's loader: same windows, maybe another batch size or
        data-parallel split) stopped."""
        if other.seq_len != self.seq_len or other.seed != self.seed:
            raise ValueError("the stages' loaders must share one seq_len and seed")
        self.advance(other.samples_seen)

    def advance(self, samples: int) -> None:
        """Skip to `samples` global samples from the start (epochs of this loader's size): where a loader
        over other windows of the same data left off (patch-level training's switch to token level)."""
        self.epoch, self.position = divmod(int(samples), self.num_samples)

    def state_dict(self) -> dict:
        return {
            "epoch": int(self.epoch),
            "position": int(self.position),
            "seed": int(self.seed),
            "seq_len": int(self.seq_len),
            "global_batch_size": int(self.global_batch_size),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` was taken (mid-epoch), refusing a state from another data setup."""
        for key in ("seed", "seq_len", "global_batch_size"):
            if int(state[key]) != getattr(self, key):
                raise ValueError(
                    f"data loader state was saved with {key}={state[key]} but this run has "
                    f"{key}={getattr(self, key)}; resuming would change the data order"
                )
        if not 0 <= int(state["position"]) < self.num_samples:
            raise ValueError(
                f"data loader state position {state['position']} is outside this split's "
                f"{self.num_samples} samples; was the dataset re-prepared?"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def _permutation(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            self._perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_samples)
            self._perm_epoch = self.epoch
        return self._perm


def iter_eval_batches(
    dataset_dir: str | Path,
    split: str,
    seq_len: int,
    batch_size: int,
    num_batches: int,
    dp_rank: int = 0,
    dp_size: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`num_batches` fixed evaluation batches: samples 0, 1, 2, ... in order (wrapping around a short
    split), `batch_size` per global batch, this rank's rows of each. Yields int64 (inputs, targets)
    of shape [batch_size // dp_size, seq_len]."""
    stream = TokenStream(dataset_dir, split)
    num_samples = _num_samples(stream, seq_len)
    rows = rank_slice(batch_size, dp_rank, dp_size)
    for b in range(num_batches):
        ids = (np.arange(b * batch_size, (b + 1) * batch_size) % num_samples)[rows]
        yield _to_batch(stream, ids, seq_len)
