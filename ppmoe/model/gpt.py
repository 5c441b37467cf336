"""A decoder-only GPT in plain PyTorch; parallelism is applied to it from outside (ppmoe.parallel)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..layers import Block, RMSNorm, SwiGLU, rotary_tables
from ..moe import MoEFeedForward, MoEShape
from ..moe.layout import LOCAL_EXPERTS, ExpertLayout


@dataclass(frozen=True)
class GPTShape:
    """Resolved sizes of a GPT (config defaults filled in, vocabulary padded)."""

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    ffn_hidden: int
    vocab_size: int
    max_seq_len: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    moe: MoEShape | None = None

    def is_moe_layer(self, index: int) -> bool:
        """MoE FFN in layers every-1, 2*every-1, ... (all layers when every == 1)."""
        return self.moe is not None and index % self.moe.every == self.moe.every - 1


def build_ffn(shape: GPTShape, index: int, expert_layout: ExpertLayout, aux_loss_scale: float) -> nn.Module:
    """The feed-forward block of layer `index`: dense SwiGLU or an MoE layer."""
    if shape.is_moe_layer(index):
        return MoEFeedForward(shape.d_model, shape.moe, expert_layout, aux_loss_scale, jitter_seed=index)
    return SwiGLU(shape.d_model, shape.ffn_hidden)


class GPT(nn.Module):
    """tokens [batch, seq] -> logits [batch, seq, vocab].

    Build it with ppmoe.model.build (on the meta device, then materialised and initialised shard by shard
    by ppmoe.model.init): the constructor allocates the structure and leaves the weights to that.

    Layers live in a ModuleDict keyed '0'..'L-1' so that a pipeline stage can drop the layers it does
    not own and keep the others' names (checkpoint keys stay the same whatever the layout); likewise
    `tok_embeddings`, `norm` and `output` may be None on stages that do not own them.

    MoE layers get `expert_layout` (where their experts live: ppmoe.moe.layout, all here by default) and
    `aux_loss_scale` (the factor of their aux losses: ppmoe.config.BatchLayout.loss_scale).
    """

    def __init__(self, shape: GPTShape, expert_layout: ExpertLayout = LOCAL_EXPERTS, aux_loss_scale: float = 1.0):
        super().__init__()
        self.shape = shape
        self.tok_embeddings = nn.Embedding(shape.vocab_size, shape.d_model)
        self.layers = nn.ModuleDict({
            str(i): Block(shape.d_model, shape.n_heads, shape.n_kv_heads,
                          build_ffn(shape, i, expert_layout, aux_loss_scale), shape.norm_eps)
            for i in range(shape.n_layers)
        })
        self.norm = RMSNorm(shape.d_model, shape.norm_eps)
        self.output = nn.Linear(shape.d_model, shape.vocab_size, bias=False)
        # Rotary tables are not parameters and not saved: they follow from the shape.
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.init_buffers()
        self.tie_weights()

    def tie_weights(self) -> None:
        """With model.tie_embeddings, make the output head use the embedding's Parameter (where this part
        of the model holds both). Called again after anything that replaces Parameters (materialising a
        meta model, tensor parallelism)."""
        if self.shape.tie_embeddings and self.tok_embeddings is not None and self.output is not None:
            self.output.weight = self.tok_embeddings.weight

    def init_buffers(self) -> None:
        """(Re)compute the rotary tables on the model's device: after construction, and after a model built
        on the meta device gets its storage (ppmoe.model.build.materialize)."""
        device = self.norm.weight.device if self.norm is not None else next(self.parameters()).device
        cos, sin = rotary_tables(self.shape.d_model // self.shape.n_heads, self.shape.max_seq_len, self.shape.rope_theta)
        self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        # The whole rotary tables: attention slices its positions (h may hold a slice of the sequence
        # under sequence parallelism, and patches rather than tokens when patch input is on).
        for layer in self.layers.values():
            h = layer(h, self.rope_cos, self.rope_sin)
        h = self.norm(h) if self.norm is not None else h
        return self.output(h) if self.output is not None else h
