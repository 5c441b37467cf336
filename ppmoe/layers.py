"""Building blocks of the GPT: RMSNorm, rotary positions, causal attention, SwiGLU.

Modules compute their head counts from the tensors they see, not from the config, so that tensor
parallelism (which shrinks the projections to the local heads) needs no change here.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    """Root-mean-square norm (no mean subtraction, no bias). x: [..., dim] -> [..., dim]."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rotary_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of rotary embeddings (Su et al., RoFormer), each [max_len, head_dim // 2]."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (first half, second half) of x: [batch, seq, heads, head_dim] by position.
    cos/sin: [seq, head_dim // 2]."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


class Attention(nn.Module):
    """Causal self-attention with optional grouped KV heads, through SDPA."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int):
        super().__init__()
        self.head_dim = d_model // n_heads
        self.wq = nn.Linear(d_model, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [batch, seq, d_model] -> [batch, seq, d_model]. cos, sin: [max_seq_len, head_dim // 2], the
        model's whole rotary tables; attention takes the rows of its own positions. Its own: under sequence
        parallelism the block holds a slice of the sequence and attention the gathered whole, so only
        here is `seq` the number of positions."""
        b, s, _ = x.shape
        if s > cos.shape[0]:
            raise ValueError(f"sequence of {s} positions is longer than the model's max_seq_len {cos.shape[0]}")
        cos, sin = cos[:s], sin[:s]
        # -1: the local number of heads, which tensor parallelism makes n_heads / tp.
        q = self.wq(x).view(b, s, -1, self.head_dim)
        k = self.wk(x).view(b, s, -1, self.head_dim)
        v = self.wv(x).view(b, s, -1, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [batch, heads, seq, head_dim]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


class SwiGLU(nn.Module):
    """Gated MLP (Shazeer, 2020): w2(silu(w1 x) * w3 x). x: [..., d_model] -> [..., d_model]."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, hidden, bias=False)
        self.w3 = nn.Linear(d_model, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class GatedSwiGLU(SwiGLU):
    """A SwiGLU whose output is scaled per token by sigmoid(gate x), gate: [1, d_model] (Qwen2-MoE's shared
    expert). x: [..., d_model] -> [..., d_model]."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__(d_model, hidden)
        self.gate = nn.Linear(d_model, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.gate(x)) * super().forward(x)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then h + ffn(norm(h))."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, ffn: nn.Module, eps: float):
        super().__init__()
        self.attention_norm = RMSNorm(d_model, eps)
        self.attention = Attention(d_model, n_heads, n_kv_heads)
        self.ffn_norm = RMSNorm(d_model, eps)
        self.feed_forward = ffn

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin)
        return h + self.feed_forward(self.ffn_norm(h))
