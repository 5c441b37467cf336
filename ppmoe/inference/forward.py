"""The GPT forward over new tokens that continue the sequence held in a KV cache."""

from __future__ import annotations

import torch

from ..model import GPT
from .attention import cached_attention
from .kv_cache import KVCache


def check_plain_model(model: GPT) -> None:
    """Refuse a pipeline stage (a model without its embedding, final norm or output head)."""
    missing = [name for name in ("tok_embeddings", "norm", "output") if getattr(model, name) is None]
    if missing:
        raise ValueError(f"generation needs the whole model on one process; this one has no {', '.join(missing)} "
                         f"(a pipeline stage)")


def forward_with_cache(model: GPT, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """tokens [batch, s] at positions cache.length..cache.length+s-1 -> logits [batch, s, vocab].

    The same function as model(all tokens so far)[:, -s:] (within fp32 rounding), computed with the
    model's own modules: the prefix's keys/values come from `cache`, the new ones are added to it.
    Any s: a prefill of the prompt (s = P into an empty cache), one decoded token (s = 1), or a chunk
    after a prefix. Run it under torch.no_grad() in eval mode (as `generate` does).
    """
    check_plain_model(model)
    batch, s = tokens.shape
    if batch != cache.batch:
        raise ValueError(f"a batch of {batch} sequences for a KV cache of {cache.batch}")
    cache.check_room(s)
    start = cache.length
    cos, sin = model.rope_cos[start:start + s], model.rope_sin[start:start + s]
    h = model.tok_embeddings(tokens)
    for name, block in model.layers.items():
        # Block.forward with the cached attention in place of block.attention.
        h = h + cached_attention(block.attention, block.attention_norm(h), cos, sin, cache, name)
        h = h + block.feed_forward(block.ffn_norm(h))
    cache.advance(s)
    return model.output(model.norm(h))
