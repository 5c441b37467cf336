"""Rules that need two sections or the world size: run once, early, before any model is built.

Each rule has one home. A rule that reads the keys of one section only is that section's check()
(schema.py, run by the loader as it builds the section); the tp x pp x dp split and the batch split are
layout.py's; the growth plan is growth_rules.py's. This module holds the rest and runs them all.
"""

from __future__ import annotations

import dataclasses

from ..errors import ConfigError
from .growth_rules import check_growth
from .layout import batch_layout, resolve_dims
from .schema import ZERO_BUBBLE_SCHEDULES, ExperimentConfig
from .sizes import derived_ffn_hidden
from .stages import stage_configs


def check_sections(cfg: ExperimentConfig) -> None:
    """Every section's own rules. The loader has run them already; they run again for a config built or
    changed in code (ExperimentConfig(...), dataclasses.replace), so that `validate` alone refuses every
    broken config and the rules below can divide by tp or n_heads."""
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        if hasattr(section, "check"):
            section.check(f"{f.name}.")


def check_tp_split(cfg: ExperimentConfig) -> None:
    """Tensor parallelism splits heads, KV heads, the FFN and the vocabulary: each must divide by tp."""
    m, tp = cfg.model, cfg.parallel.tp
    for key, value in {"model.n_heads": m.n_heads, "model.n_kv_heads": m.n_kv_heads or m.n_heads,
                       "model.ffn_hidden": derived_ffn_hidden(m)}.items():
        if value % tp:
            raise ConfigError(f"{key}={value} is not divisible by parallel.tp={tp}; choose a tp that divides it")
    if m.vocab_multiple % tp:
        raise ConfigError(
            f"model.vocab_multiple={m.vocab_multiple} must be divisible by parallel.tp={tp} "
            f"so the padded vocabulary splits evenly across TP ranks"
        )


def check_pipeline_fits_model(cfg: ExperimentConfig) -> None:
    """The pipeline's stages against the model's layers and the training options (the schedule's stages per
    rank are ParallelConfig's, the micro-batches BatchLayout's). A tied embedding is fine: its two copies are
    kept equal (ppmoe.parallel.tied_embeddings)."""
    par, model = cfg.parallel, cfg.model
    if par.pp == 1:
        return
    stages = par.pp * par.pp_virtual_stages
    if par.pp_layers is None and model.n_layers < stages:
        raise ConfigError(f"model.n_layers={model.n_layers} is fewer than the {stages} pipeline stages; raise "
                          f"model.n_layers or lower parallel.pp (or parallel.pp_virtual_stages)")
    if par.pp_layers is not None and sum(par.pp_layers) != model.n_layers:
        raise ConfigError(f"parallel.pp_layers={par.pp_layers} sums to {sum(par.pp_layers)}; its entries must sum "
                          f"to model.n_layers={model.n_layers}")
    if par.pp_schedule in ZERO_BUBBLE_SCHEDULES and cfg.train.compile:
        # torch.distributed.pipelining splits the autograd graph into B and W; through compiled blocks'
        # fused backward that split is not supported here
        raise ConfigError(f"parallel.pp_schedule={par.pp_schedule} splits each backward into input and weight "
                          f"gradients, which is not supported through compiled blocks: set train.compile: false, "
                          f"or use pp_schedule 1f1b / interleaved_1f1b")
    if par.pp_schedule in ZERO_BUBBLE_SCHEDULES and cfg.train.activation_checkpointing != "none":
        # The split backward recomputes a checkpointed block twice (for B, then for W); per-op selective
        # checkpointing hands out its saved tensors once, and the MoE replay contexts are single-use.
        raise ConfigError(f"parallel.pp_schedule={par.pp_schedule} splits each backward in two, and "
                          f"train.activation_checkpointing={cfg.train.activation_checkpointing} would recompute "
                          f"each block twice: set train.activation_checkpointing: none, or use pp_schedule "
                          f"1f1b / interleaved_1f1b")


def check_moe_fits_model(cfg: ExperimentConfig) -> None:
    """Where the MoE layers go and how their experts split over the TP ranks."""
    moe, tp = cfg.moe, cfg.parallel.tp
    if moe.num_experts == 0:
        return
    if moe.every > cfg.model.n_layers:
        raise ConfigError(f"moe.every={moe.every} must be between 1 and model.n_layers={cfg.model.n_layers}")
    if moe.dispatcher == "experts_in_tp" and moe.num_experts % tp:
        raise ConfigError(f"moe.num_experts={moe.num_experts} is not divisible by parallel.tp={tp}: "
                          f"Pipeline-MoE gives each TP rank whole experts")
    hidden = moe.expert_hidden or derived_ffn_hidden(cfg.model)
    # 16-byte rows: 4 fp32 or 8 bf16 values ('auto' may be bf16: on a GPU)
    per_row = 4 if cfg.train.dtype == "fp32" else 8
    if moe.expert_kernel == "grouped_mm" and (cfg.model.d_model % per_row or hidden % per_row):
        raise ConfigError(f"moe.expert_kernel=grouped_mm needs model.d_model ({cfg.model.d_model}) and the expert "
                          f"hidden size ({hidden}) divisible by {per_row} (16-byte rows in "
                          f"train.dtype={cfg.train.dtype}); use 'auto' or 'padded_bmm'")
    if moe.shared_expert_hidden % tp:
        raise ConfigError(f"moe.shared_expert_hidden={moe.shared_expert_hidden} is not divisible by parallel.tp={tp}; "
                          f"make it a multiple of parallel.tp")


def check_alltoall(cfg: ExperimentConfig, dp: int) -> None:
    """The all-to-all baseline spreads experts over all data-parallel ranks (ep = dp) at TP=1, as
    DeepSpeed-MoE's DPMoE does."""
    moe = cfg.moe
    if moe.num_experts == 0 or moe.dispatcher != "alltoall":
        return
    if cfg.parallel.tp != 1:
        raise ConfigError("moe.dispatcher=alltoall runs at parallel.tp=1 (experts over the data-parallel "
                          "ranks); with tensor parallelism use moe.dispatcher=experts_in_tp")
    if moe.ep is not None and moe.ep != dp:
        raise ConfigError(f"moe.ep={moe.ep} must equal the data-parallel size {dp} (or be null): experts are "
                          f"spread over all data-parallel ranks")
    if moe.num_experts % dp:
        raise ConfigError(f"moe.num_experts={moe.num_experts} is not divisible by the expert-parallel size "
                          f"(= data-parallel size) {dp}; use a multiple of it, or run on another number of processes")


def check_sequence_parallel(cfg: ExperimentConfig) -> None:
    """Sequence parallelism gives each TP rank an equal slice of every sequence (of patches too: a slice of
    seq_len / tp patches is K * seq_len / tp tokens), and MoE layers need a layout that takes slices."""
    par, moe = cfg.parallel, cfg.moe
    if not par.sequence_parallel or par.tp == 1:
        return
    if cfg.train.seq_len % par.tp:
        raise ConfigError(f"train.seq_len={cfg.train.seq_len} is not divisible by parallel.tp={par.tp}: "
                          f"parallel.sequence_parallel splits every sequence over the TP ranks; choose a "
                          f"multiple of parallel.tp or set parallel.sequence_parallel: false")
    if moe.num_experts and moe.dispatcher == "local":
        raise ConfigError("moe.dispatcher=local has no sequence-parallel form (every TP rank would run every "
                          "expert on the whole sequence); with parallel.sequence_parallel use "
                          "moe.dispatcher=experts_in_tp")


def check_warmup_fits_run(cfg: ExperimentConfig) -> None:
    """Not a TrainConfig rule: under growth each stage sets its own warmup_steps, while steps is the run's."""
    t = cfg.train
    if t.warmup_steps > t.steps:
        raise ConfigError(f"train.warmup_steps={t.warmup_steps} is larger than train.steps={t.steps}; lower "
                          f"train.warmup_steps")


def validate(cfg: ExperimentConfig, world_size: int) -> int:
    """Check the whole config for a run on `world_size` processes: the growth plan, then every stage as a
    run of its own (a plain run is one stage). Returns the final stage's data-parallel size."""
    check_growth(cfg)
    configs = stage_configs(cfg)
    dp = 0
    for index, stage in enumerate(configs):
        try:
            dp = validate_stage(stage, world_size)
        except ConfigError as e:
            if len(configs) == 1:
                raise
            name = cfg.growth.stages[index].name
            raise ConfigError(f"growth stage {index} ({name!r}; the top-level config with growth.stages.{index} "
                              f"overrides): {e}") from None
    return dp


def validate_stage(cfg: ExperimentConfig, world_size: int) -> int:
    """Check one stage's config (the whole config of a run without growth); returns its data-parallel size."""
    check_sections(cfg)
    check_pipeline_fits_model(cfg)
    dims = resolve_dims(cfg, world_size)
    check_tp_split(cfg)
    check_moe_fits_model(cfg)
    check_alltoall(cfg, dims.dp)
    check_sequence_parallel(cfg)
    batch_layout(cfg, dims)
    check_warmup_fits_run(cfg)
    return dims.dp
