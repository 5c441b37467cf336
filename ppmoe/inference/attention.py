"""Causal self-attention over cached keys/values, with the weights of a ppmoe.layers.Attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..layers import Attention, apply_rotary
from .kv_cache import KVCache
from .masks import prefix_causal_mask


def cached_attention(attention: Attention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     cache: KVCache, layer: str) -> torch.Tensor:
    """x: [batch, s, d_model], the new positions cache.length..cache.length+s-1 -> [batch, s, d_model].

    cos, sin: [s, head_dim // 2], the rotary tables at those positions. Stores the new keys/values in
    `cache` (layer `layer`) and attends over all cached positions. The same computation as
    Attention.forward (which stays free of cache arguments) but for where keys and values come from.
    """
    b, s, _ = x.shape
    start = cache.length
    # -1: the heads of the local weights, as in Attention.forward.
    q = attention.wq(x).view(b, s, -1, attention.head_dim)
    k = attention.wk(x).view(b, s, -1, attention.head_dim)
    v = attention.wv(x).view(b, s, -1, attention.head_dim)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [batch, heads, s, head_dim]
    keys, values = cache.store(layer, k, v)  # [batch, kv_heads, start+s, head_dim]
    gqa = keys.shape[1] != q.shape[1]
    if start == 0:
        # An empty cache: the plain causal triangle, the very call Attention.forward makes.
        out = F.scaled_dot_product_attention(q, keys, values, is_causal=True, enable_gqa=gqa)
    else:
        mask = prefix_causal_mask(start, s, x.device)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=gqa)
    return attention.wo(out.transpose(1, 2).reshape(b, s, -1))
