"""Config -> GPT: fill defaults, pad the vocabulary, initialise deterministically from the seed."""

from __future__ import annotations

import torch

from ..config import ExperimentConfig, compute_dtype, derived_ffn_hidden, padded_vocab_size
from ..moe.experts import resolve_kernel
from ..moe.layout import LOCAL_EXPERTS, ExpertLayout
from ..moe.shape import MoEShape
from .gpt import GPT, GPTShape
from .init import initialise


def moe_shape(cfg: ExperimentConfig, device_type: str = "cpu") -> MoEShape | None:
    moe = cfg.moe
    if moe.num_experts == 0:
        return None
    hidden = moe.expert_hidden or derived_ffn_hidden(cfg.model)
    return MoEShape(
        num_experts=moe.num_experts, top_k=moe.top_k, every=moe.every,
        expert_hidden=hidden,
        shared_expert_hidden=moe.shared_expert_hidden,
        shared_expert_gate=moe.shared_expert_gate, normalize_topk=moe.normalize_topk, jitter=moe.jitter,
        capacity_factor=moe.capacity_factor, aux_loss_coef=moe.aux_loss_coef, z_loss_coef=moe.z_loss_coef,
        expert_kernel=resolve_kernel(moe.expert_kernel, device_type, cfg.model.d_model, hidden,
                                     compute_dtype(cfg.train.dtype, device_type)),
    )


def model_shape(cfg: ExperimentConfig, vocab_size: int | None = None, device_type: str = "cpu") -> GPTShape:
    """Sizes of the model; `vocab_size` (from the dataset) is used when model.vocab_size is null;
    `device_type` resolves the 'auto' expert kernel."""
    m = cfg.model
    vocab = m.vocab_size or vocab_size
    if vocab is None:
        raise ValueError("model.vocab_size is null and no dataset vocabulary was given")
    return GPTShape(
        n_layers=m.n_layers, d_model=m.d_model, n_heads=m.n_heads, n_kv_heads=m.n_kv_heads or m.n_heads,
        ffn_hidden=derived_ffn_hidden(m), vocab_size=padded_vocab_size(vocab, m.vocab_multiple),
        max_seq_len=cfg.train.seq_len, rope_theta=m.rope_theta, norm_eps=m.norm_eps,
        tie_embeddings=m.tie_embeddings, init_std=m.init_std, moe=moe_shape(cfg, device_type),
    )


def meta_model(shape: GPTShape, expert_layout: ExpertLayout = LOCAL_EXPERTS, aux_loss_scale: float = 1.0) -> GPT:
    """The model's structure without storage (the meta device): what parallelism is applied to before any
    weight exists (then `materialize`), and what shapes and counts are read from."""
    with torch.device("meta"):
        return GPT(shape, expert_layout, aux_loss_scale)


def materialize(model: GPT, seed: int, device: torch.device | str) -> GPT:
    """Give a meta-device model (or pipeline stage, possibly sharded) storage on `device` for its own
    shards only, and initialise them as the one-process model of `seed` is (ppmoe.model.init): the
    weights do not depend on the layout. Returns `model`."""
    # Swapping keeps every Parameter object (what hooks, FSDP's ignored set and tied names refer to) and
    # gives it storage; the default conversion would replace meta Parameters by new objects.
    swapping = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.to_empty(device=device)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swapping)
    initialise(model, seed, model.shape.init_std, model.shape.n_layers)
    model.init_buffers()
    return model


def build_model(shape: GPTShape, seed: int, device: torch.device | str = "cpu",
                expert_layout: ExpertLayout = LOCAL_EXPERTS, aux_loss_scale: float = 1.0) -> GPT:
    """The whole model on one process, initialised from `seed` (the same weights every layout's shards
    hold). `expert_layout`: where MoE layers' experts live; `aux_loss_scale`: the factor of the MoE aux
    losses (BatchLayout.loss_scale). Parallel runs build `meta_model` and `materialize` it after
    parallelism instead (ppmoe.train.parallelize), so no rank holds the whole model."""
    return materialize(meta_model(shape, expert_layout, aux_loss_scale), seed, device)


def parameter_shapes(shape: GPTShape) -> dict[str, tuple[int, ...]]:
    """{state-dict key: tensor shape} of the model: what a checkpoint of it holds."""
    return {key: tuple(value.shape) for key, value in meta_model(shape).state_dict().items()}


def count_parameters(shape: GPTShape) -> int:
    """Parameters of the whole model (a tied embedding counted once)."""
    return sum(p.numel() for p in meta_model(shape).parameters())
