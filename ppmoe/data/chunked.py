"""One data order for a run whose stages read windows of different lengths (patch stages read
K * (T + 1) tokens per sample, token stages T + 1; a stage may also shorten T), so that each stage reads
what the earlier stages did not.

The split is cut into chunks of `chunk_len` tokens, the longest window of any stage. Each epoch visits
the chunks in a seeded permutation. A stage with windows of L tokens reads chunk_len // L consecutive
windows from each chunk (a patch stage with K = K_max: one window, a chunk; a token stage after it: K
windows, as patch-level training wants). When a stage ends inside a chunk and the next reads windows of
another length, the next starts on a fresh chunk, so no token is read twice within an epoch.
Batches have the ordinary loader's format: (inputs, targets) with targets shifted by one,
[global_batch_size / dp, L - 1] each.
"""

from __future__ import annotations

import numpy as np
import torch

from .loader import TokenStream, rank_slice


class ChunkedLoader:
    def __init__(self, dataset_dir: str, split: str, chunk_len: int, window_len: int, global_batch_size: int,
                 dp_rank: int, dp_size: int, seed: int):
        if window_len > chunk_len:
            raise ValueError(f"a window of {window_len} tokens does not fit a chunk of {chunk_len}")
        self.stream = TokenStream(dataset_dir, split)
        self.chunk_len, self.window_len, self.seed = chunk_len, window_len, seed
        self.global_batch_size = global_batch_size
        self.per_chunk = chunk_len // window_len
        self.num_chunks = len(self.stream) // chunk_len
        if self.num_chunks == 0:
            raise ValueError(f"the {split} split ({len(self.stream)} tokens) is shorter than one sample of the "
                             f"longest stage ({chunk_len} tokens): lower train.seq_len or the patch size")
        self.rows = rank_slice(global_batch_size, dp_rank, dp_size)
        self.epoch, self.chunk, self.sub = 0, 0, 0  # sub: windows of this chunk already handed out
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def continue_from(self, other: "ChunkedLoader") -> None:
        """Carry on where `other` (the previous stage's loader over the same chunks) stopped."""
        if other.chunk_len != self.chunk_len or other.seed != self.seed:
            raise ValueError("the stages' loaders must share one chunking and seed")
        self.epoch, self.chunk, self.sub = other.epoch, other.chunk, other.sub
        if self.sub and other.window_len != self.window_len:
            self._next_chunk()  # the rest of this chunk is cut for the other window length

    def _next_chunk(self) -> None:
        self.sub, self.chunk = 0, self.chunk + 1
        if self.chunk == self.num_chunks:
            self.epoch, self.chunk = self.epoch + 1, 0

    def _permutation(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            self._perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_chunks)
            self._perm_epoch = self.epoch
        return self._perm

    def _take_offsets(self, count: int) -> list[int]:
        """Token offsets of the next `count` windows of the whole global batch."""
        offsets = []
        for _ in range(count):
            offsets.append(int(self._permutation()[self.chunk]) * self.chunk_len + self.sub * self.window_len)
            self.sub += 1
            if self.sub == self.per_chunk:
                self._next_chunk()
        return offsets

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        offsets = self._take_offsets(self.global_batch_size)[self.rows]
        rows = torch.from_numpy(np.stack([self.stream.window(o, self.window_len) for o in offsets]).astype(np.int64))
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def state_dict(self) -> dict:
        return {"epoch": int(self.epoch), "chunk": int(self.chunk), "sub": int(self.sub), "seed": int(self.seed),
                "chunk_len": int(self.chunk_len), "window_len": int(self.window_len),
                "global_batch_size": int(self.global_batch_size)}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "chunk_len", "window_len", "global_batch_size"):
            if int(state[key]) != getattr(self, key):
                raise ValueError(f"data loader state was saved with {key}={state[key]} but this run has "
                                 f"{key}={getattr(self, key)}; resuming would change the data order")
        if not 0 <= int(state["chunk"]) < self.num_chunks:
            raise ValueError(f"data loader state chunk {state['chunk']} is outside this split's {self.num_chunks} "
                             f"chunks; was the dataset re-prepared?")
        self.epoch, self.chunk, self.sub = int(state["epoch"]), int(state["chunk"]), int(state["sub"])
