"""Checks that need more than one key (or the world size): run once, early, before any model is built."""

from __future__ import annotations

from .loader import ConfigError
from .growth_rules import check_growth
from .layout import batch_layout, resolve_dims
from .schema import ExperimentConfig
from .sizes import derived_ffn_hidden
from .stages import stage_configs


def check_positive(cfg: ExperimentConfig) -> None:
    positive = {
        "model.n_layers": cfg.model.n_layers, "model.d_model": cfg.model.d_model,
        "model.n_heads": cfg.model.n_heads, "model.vocab_multiple": cfg.model.vocab_multiple,
        "parallel.tp": cfg.parallel.tp, "parallel.pp": cfg.parallel.pp,
        "train.steps": cfg.train.steps, "train.global_batch_size": cfg.train.global_batch_size,
        "train.micro_batch_size": cfg.train.micro_batch_size, "train.seq_len": cfg.train.seq_len,
        "train.log_every": cfg.train.log_every, "data.vocab_size": cfg.data.vocab_size,
        "data.shard_tokens": cfg.data.shard_tokens,
    }
    for key in ("n_kv_heads", "ffn_hidden", "vocab_size"):  # optional sizes: null or >= 1
        if getattr(cfg.model, key) is not None:
            positive[f"model.{key}"] = getattr(cfg.model, key)
    if cfg.train.val_every:
        positive["train.val_batches"] = cfg.train.val_batches
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    for key, value in {"train.warmup_steps": cfg.train.warmup_steps, "train.val_every": cfg.train.val_every,
                       "checkpoint.every": cfg.checkpoint.every, "checkpoint.keep": cfg.checkpoint.keep,
                       "train.grad_clip": cfg.train.grad_clip}.items():
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
    if cfg.train.nonfinite_max < 1:
        raise ConfigError(f"train.nonfinite_max must be >= 1, got {cfg.train.nonfinite_max}")
    if cfg.train.loss_spike_factor < 0 or 0 < cfg.train.loss_spike_factor <= 1:
        raise ConfigError(f"train.loss_spike_factor must be above 1 (or 0 to disable), got "
                          f"{cfg.train.loss_spike_factor}")
    if not 0.0 < cfg.data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in (0, 1), got {cfg.data.val_fraction}")


def check_model_split(cfg: ExperimentConfig) -> None:
    """Tensor parallelism splits heads, KV heads, the FFN and the vocabulary: each must divide by tp."""
    m, tp = cfg.model, cfg.parallel.tp
    kv = m.n_kv_heads or m.n_heads
    if m.d_model % m.n_heads:
        raise ConfigError(f"model.n_heads={m.n_heads} must divide model.d_model={m.d_model}")
    if m.n_heads % kv:
        raise ConfigError(f"model.n_kv_heads={kv} must divide model.n_heads={m.n_heads}")
    if (m.d_model // m.n_heads) % 2:
        raise ConfigError(f"head dim d_model/n_heads = {m.d_model // m.n_heads} must be even for rotary embeddings")
    for key, value in {"model.n_heads": m.n_heads, "model.n_kv_heads": kv,
                       "model.ffn_hidden": derived_ffn_hidden(m)}.items():
        if value % tp:
            raise ConfigError(f"{key}={value} is not divisible by parallel.tp={tp}; choose a tp that divides it")
    if m.vocab_multiple % tp:
        raise ConfigError(
            f"model.vocab_multiple={m.vocab_multiple} must be divisible by parallel.tp={tp} "
            f"so the padded vocabulary splits evenly across TP ranks"
        )


def check_patch(cfg: ExperimentConfig) -> None:
    patch = cfg.patch
    if patch.size < 1:
        raise ConfigError(f"patch.size must be >= 1 (1 = token level), got {patch.size}")
    if not 0.0 <= patch.fraction < 1.0:
        raise ConfigError(f"patch.fraction must be in [0, 1) (the token phase needs some tokens), got {patch.fraction}")
    if patch.token_warmup_steps is not None and patch.token_warmup_steps < 0:
        raise ConfigError(f"patch.token_warmup_steps must be >= 0, got {patch.token_warmup_steps}")


def check_pipeline(cfg: ExperimentConfig) -> None:
    """The pipeline's stages and schedule (its micro-batches: BatchLayout)."""
    par = cfg.parallel
    if par.pp_virtual_stages < 1:
        raise ConfigError(f"parallel.pp_virtual_stages must be >= 1, got {par.pp_virtual_stages}")
    if par.pp == 1:
        if par.pp_virtual_stages != 1 or par.pp_layers:
            raise ConfigError("parallel.pp_virtual_stages / pp_layers only apply with parallel.pp > 1")
        return
    interleaved = par.pp_schedule == "interleaved_1f1b"
    if interleaved and par.pp_virtual_stages < 2:
        raise ConfigError("parallel.pp_schedule=interleaved_1f1b needs parallel.pp_virtual_stages >= 2")
    if not interleaved and par.pp_virtual_stages != 1:
        raise ConfigError(f"parallel.pp_schedule={par.pp_schedule} runs one stage per rank: set "
                          f"parallel.pp_virtual_stages: 1 or use interleaved_1f1b")
    stages = par.pp * par.pp_virtual_stages
    if par.pp_layers is None and cfg.model.n_layers < stages:
        raise ConfigError(f"model.n_layers={cfg.model.n_layers} is fewer than the {stages} pipeline stages")
    if par.pp_layers is not None and (len(par.pp_layers) != stages or sum(par.pp_layers) != cfg.model.n_layers
                                      or min(par.pp_layers) < 1):
        raise ConfigError(f"parallel.pp_layers={par.pp_layers} must have {stages} entries (pp * "
                          f"pp_virtual_stages), each >= 1, summing to model.n_layers={cfg.model.n_layers}")
    if cfg.model.tie_embeddings:
        raise ConfigError("model.tie_embeddings is not supported with parallel.pp > 1 (the embedding and the "
                          "output head live on different stages); set it to false")


def check_moe(cfg: ExperimentConfig) -> None:
    moe, tp = cfg.moe, cfg.parallel.tp
    if moe.num_experts == 0:
        return
    if moe.num_experts < 0:
        raise ConfigError(f"moe.num_experts must be >= 0, got {moe.num_experts}")
    if not 1 <= moe.top_k <= moe.num_experts:
        raise ConfigError(f"moe.top_k={moe.top_k} must be between 1 and moe.num_experts={moe.num_experts}")
    if not 1 <= moe.every <= cfg.model.n_layers:
        raise ConfigError(f"moe.every={moe.every} must be between 1 and model.n_layers={cfg.model.n_layers}")
    if moe.capacity_factor is not None and moe.capacity_factor <= 0:
        raise ConfigError(f"moe.capacity_factor must be > 0 or null (dropless), got {moe.capacity_factor}")
    if moe.dispatcher == "experts_in_tp" and moe.num_experts % tp:
        raise ConfigError(f"moe.num_experts={moe.num_experts} is not divisible by parallel.tp={tp}: "
                          f"Pipeline-MoE gives each TP rank whole experts")
    hidden = moe.expert_hidden or derived_ffn_hidden(cfg.model)
    if moe.expert_kernel == "grouped_mm" and (cfg.model.d_model % 4 or hidden % 4):
        raise ConfigError(f"moe.expert_kernel=grouped_mm needs model.d_model ({cfg.model.d_model}) and the expert "
                          f"hidden size ({hidden}) divisible by 4 (16-byte rows); use 'auto' or 'padded_bmm'")
    if moe.shared_expert_hidden % tp:
        raise ConfigError(f"moe.shared_expert_hidden={moe.shared_expert_hidden} is not divisible by parallel.tp={tp}")


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
                          f"(= data-parallel size) {dp}")


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
    check_positive(cfg)
    check_pipeline(cfg)
    dims = resolve_dims(cfg, world_size)
    dp = dims.dp
    check_model_split(cfg)
    check_moe(cfg)
    check_patch(cfg)
    check_alltoall(cfg, dp)
    batch_layout(cfg, dims)
    t = cfg.train
    if t.warmup_steps > t.steps:
        raise ConfigError(f"train.warmup_steps={t.warmup_steps} is larger than train.steps={t.steps}")
    if t.min_lr > t.lr:
        raise ConfigError(f"train.min_lr={t.min_lr} is above train.lr={t.lr}")
    if t.resume not in ("auto", "none") and not t.resume:
        raise ConfigError("train.resume must be 'auto', 'none' or a checkpoint path")
    return dp
