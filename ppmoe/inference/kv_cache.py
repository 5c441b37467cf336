"""Keys and values of the positions a model has already seen, per layer, preallocated."""

from __future__ import annotations

import torch

from ..model import GPT


class KVCache:
    """Per layer (keyed like model.layers: '0'..'L-1') keys and values [batch, kv_heads, max_len, head_dim],
    and `length`, the number of positions filled (the same for every layer and every sequence of the batch).

    Preallocated at max_len so that appending is a copy into a slice, not a new tensor per token.
    Keys are stored after the rotary rotation: a key's rotation depends only on its own position, so it
    never needs to be recomputed.
    """

    def __init__(self, keys: dict[str, torch.Tensor], values: dict[str, torch.Tensor]):
        self.keys, self.values = keys, values
        first = next(iter(keys.values()))
        self.batch, self.max_len = first.shape[0], first.shape[2]
        self.length = 0

    @classmethod
    def for_model(cls, model: GPT, batch: int = 1, max_len: int | None = None) -> KVCache:
        """An empty cache for `model` (max_len: the model's max_seq_len by default, never more), on the
        model's device and in its parameters' dtype. Head counts come from the local weights
        (wk.out_features // head_dim), as Attention itself infers them."""
        limit = model.shape.max_seq_len
        max_len = limit if max_len is None else max_len
        if not 1 <= max_len <= limit:
            raise ValueError(f"a KV cache of {max_len} positions: it must hold 1 to the model's max_seq_len "
                             f"{limit} positions")
        keys, values = {}, {}
        for name, layer in model.layers.items():
            attention = layer.attention
            kv_heads = attention.wk.out_features // attention.head_dim
            weight = attention.wk.weight
            size = (batch, kv_heads, max_len, attention.head_dim)
            keys[name] = torch.zeros(size, dtype=weight.dtype, device=weight.device)
            values[name] = torch.zeros(size, dtype=weight.dtype, device=weight.device)
        return cls(keys, values)

    def check_room(self, new: int) -> None:
        """Refuse `new` more positions when they do not fit."""
        if self.length + new > self.max_len:
            raise ValueError(f"{self.length} cached + {new} new positions exceed the KV cache's {self.max_len} "
                             f"positions (at most the model's max_seq_len)")

    def store(self, layer: str, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [batch, kv_heads, s, head_dim] of layer `layer` at positions length..length+s-1 and
        return all keys and values so far, [batch, kv_heads, length+s, head_dim] (views of the cache).
        `length` itself moves in `advance`, once every layer has stored its part."""
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, new: int) -> None:
        self.length += new

    def reset(self) -> None:
        """Forget every position (the buffers are kept and overwritten by the next forward)."""
        self.length = 0
