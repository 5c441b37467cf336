"""Config -> GPT: fill defaults, pad the vocabulary, initialise deterministically from the seed."""

from __future__ import annotations

import torch

from ..config import ExperimentConfig, derived_ffn_hidden, padded_vocab_size
from ..moe.experts import resolve_kernel
from ..moe.layout import LOCAL_EXPERTS, ExpertLayout
from ..moe.shape import MoEShape
from .gpt import GPT, GPTShape


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
        expert_kernel=resolve_kernel(moe.expert_kernel, device_type, cfg.model.d_model, hidden),
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


def build_model(shape: GPTShape, seed: int, device: torch.device | str = "cpu",
                expert_layout: ExpertLayout = LOCAL_EXPERTS, aux_loss_scale: float = 1.0) -> GPT:
    """The full model, initialised identically on every rank (same seed), before any parallelism (which
    `expert_layout` then applies to the experts: ppmoe.parallel.apply_expert_layout). `aux_loss_scale`:
    the factor of the MoE aux losses (BatchLayout.loss_scale). Initialisation runs on CPU so the weights
    do not depend on the device's random generator."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = GPT(shape, expert_layout, aux_loss_scale)
    torch.random.set_rng_state(generator_state)
    return model.to(device)


def meta_model(shape: GPTShape) -> GPT:
    """The model's structure without storage (the meta device): for shapes and counts, never for compute."""
    with torch.device("meta"):
        return GPT(shape)


def parameter_shapes(shape: GPTShape) -> dict[str, tuple[int, ...]]:
    """{state-dict key: tensor shape} of the model: what a checkpoint of it holds."""
    return {key: tuple(value.shape) for key, value in meta_model(shape).state_dict().items()}


def count_parameters(shape: GPTShape) -> int:
    """Parameters of the whole model (a tied embedding counted once)."""
    return sum(p.numel() for p in meta_model(shape).parameters())
