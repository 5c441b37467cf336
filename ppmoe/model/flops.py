"""Training FLOPs per token and model FLOPs utilisation (MFU)."""

from __future__ import annotations

import torch

from .gpt import GPTShape

# Dense bf16 peak FLOP/s of one device (vendor data sheets, without sparsity).
KNOWN_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "V100": 125e12}


def matmul_params(shape: GPTShape) -> int:
    """Parameters that take part in a matmul per token (everything but the embedding lookup and norms);
    for MoE layers the active ones: router, top_k experts and the shared expert."""
    head_dim = shape.d_model // shape.n_heads
    attn = shape.d_model * head_dim * (2 * shape.n_heads + 2 * shape.n_kv_heads)
    total = shape.d_model * shape.vocab_size
    for index in range(shape.n_layers):
        if shape.is_moe_layer(index):
            moe = shape.moe
            ffn = shape.d_model * (moe.num_experts + 3 * (moe.top_k * moe.expert_hidden + moe.shared_expert_hidden))
        else:
            ffn = 3 * shape.d_model * shape.ffn_hidden
        total += attn + ffn
    return total


def training_flops_per_token(shape: GPTShape, seq_len: int) -> float:
    """6 * matmul params (forward 2, backward 4) plus causal attention scores and values:
    12 * L * d_model * seq per token for full attention, halved because the mask skips half (PaLM, app. B
    counts the full square; we count what a causal kernel computes)."""
    return 6.0 * matmul_params(shape) + 6.0 * shape.n_layers * shape.d_model * seq_len


def peak_flops_per_device(configured: float | None) -> float | None:
    """The configured peak, else a lookup by the CUDA device name, else None (no MFU shown)."""
    if configured:
        return configured
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, value in KNOWN_PEAK_FLOPS.items():
            if key in name:
                return value
    return None
