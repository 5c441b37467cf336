"""One data order for both phases of patch-level training, so the token phase reads what the patch phase
did not (the paper: the first lambda of the data at patch level, the rest at token level).

The split is cut into chunks of K * (T + 1) tokens. A chunk is exactly one patch-phase sample (K*T input
tokens plus the next patch's K targets) or K token-phase samples of T + 1 tokens. Each epoch visits the
chunks in a seeded permutation; the position counts token windows (K per chunk), so the patch phase
advances it by K per sample and the token phase by 1, and the switch simply continues from there.
Batches have the ordinary loader's format: (inputs, targets) with targets shifted by one, [B/dp, L - 1]
for windows of L tokens (L = K*T + K in the patch phase, T + 1 in the token phase).
"""

from __future__ import annotations

import numpy as np
import torch

from ppmoe.data.loader import TokenStream, _rank_slice


class PhaseAlignedLoader:
    def __init__(self, dataset_dir: str, split: str, seq_len: int, patch_size: int, global_batch_size: int,
                 dp_rank: int, dp_size: int, seed: int):
        self.stream = TokenStream(dataset_dir, split)
        self.seq_len, self.patch_size, self.global_batch_size, self.seed = seq_len, patch_size, global_batch_size, seed
        self.chunk = patch_size * (seq_len + 1)
        self.num_chunks = len(self.stream) // self.chunk
        if self.num_chunks == 0:
            raise ValueError(f"the {split} split ({len(self.stream)} tokens) is shorter than one patch sample "
                             f"({self.chunk} tokens): lower train.seq_len or patch.size")
        self.rows = _rank_slice(global_batch_size, dp_rank, dp_size)
        self.epoch, self.position = 0, 0  # position: token windows of this epoch already handed out
        self.mode = "patch"
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def set_phase(self, name: str) -> None:
        """'patch' or 'token'. The patch phase starts on a chunk boundary (it only ever moves in chunks)."""
        if name == "patch" and self.position % self.patch_size:
            raise ValueError("the patch phase must start on a chunk boundary")
        self.mode = name

    @property
    def windows_per_epoch(self) -> int:
        return self.num_chunks * self.patch_size

    @property
    def samples_seen(self) -> int:
        return self.epoch * self.windows_per_epoch + self.position

    def _permutation(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            self._perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_chunks)
            self._perm_epoch = self.epoch
        return self._perm

    def _take_windows(self, count: int, step: int) -> list[int]:
        """Token offsets of the next `count` samples, each `step` windows long."""
        offsets = []
        for _ in range(count):
            chunk, sub = divmod(self.position, self.patch_size)
            offsets.append(int(self._permutation()[chunk]) * self.chunk + sub * (self.seq_len + 1))
            self.position += step
            if self.position == self.windows_per_epoch:
                self.epoch, self.position = self.epoch + 1, 0
        return offsets

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        patch = self.mode == "patch"
        length = self.chunk if patch else self.seq_len + 1
        offsets = self._take_windows(self.global_batch_size, self.patch_size if patch else 1)[self.rows]
        rows = torch.from_numpy(np.stack([self.stream.window(o, length) for o in offsets]).astype(np.int64))
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def state_dict(self) -> dict:
        return {"epoch": int(self.epoch), "position": int(self.position), "seed": int(self.seed),
                "seq_len": int(self.seq_len), "global_batch_size": int(self.global_batch_size)}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "seq_len", "global_batch_size"):
            if int(state[key]) != getattr(self, key):
                raise ValueError(f"data loader state was saved with {key}={state[key]} but this run has "
                                 f"{key}={getattr(self, key)}; resuming would change the data order")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
