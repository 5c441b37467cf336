"""Sizes derived from the config (defaults filled in), shared by the checks and the model builder."""

from __future__ import annotations

from .schema import ModelConfig


def derived_ffn_hidden(model: ModelConfig) -> int:
    """SwiGLU hidden size: 8/3 * d_model rounded up to a multiple of 64 unless set explicitly."""
    if model.ffn_hidden is not None:
        return model.ffn_hidden
    return -(-(8 * model.d_model // 3) // 64) * 64


def padded_vocab_size(vocab_size: int, multiple: int) -> int:
    return -(-vocab_size // multiple) * multiple
