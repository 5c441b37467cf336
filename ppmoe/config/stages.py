"""The experiment config of each growth stage: the top-level config (the final model) with the stage's
partial overrides of model, moe, train and parallel applied.

A stage config is an ordinary single-stage ExperimentConfig (no growth, no patch.* phases), so every
rule that checks a run checks each stage the same way, and the trainer builds a stage exactly as it
builds a plain run. Derived sizes (ffn_hidden, n_kv_heads, expert_hidden left null) follow the stage's
own d_model and n_heads.
"""

from __future__ import annotations

import dataclasses

from .loader import ConfigError, from_dict
from .schema import ExperimentConfig, GrowthConfig, ModelConfig, MoEConfig, ParallelConfig, PatchConfig, TrainConfig

# What a stage may change in `train`: the optimiser's settings and the batch shape. The rest (steps,
# seed, resume, logging cadence) belongs to the run as a whole.
STAGE_TRAIN_KEYS = ("lr", "min_lr", "warmup_steps", "weight_decay", "beta1", "beta2", "grad_clip",
                    "global_batch_size", "micro_batch_size", "seq_len", "dtype")

SECTIONS = {"model": ModelConfig, "moe": MoEConfig, "train": TrainConfig, "parallel": ParallelConfig}


def stage_configs(cfg: ExperimentConfig) -> list[ExperimentConfig]:
    """One resolved config per stage, in order; [cfg] itself for a run without growth.stages.
    Raises ConfigError naming the key (growth.stages.N.section.key) for an unknown or mistyped override."""
    if not cfg.growth.stages:
        return [cfg]
    return [resolve_stage(cfg, index) for index in range(len(cfg.growth.stages))]


def resolve_stage(cfg: ExperimentConfig, index: int) -> ExperimentConfig:
    stage = cfg.growth.stages[index]
    prefix = f"growth.stages.{index}"
    refused = sorted(set(stage.train) - set(STAGE_TRAIN_KEYS))
    if refused:
        raise ConfigError(f"{prefix}.train.{refused[0]} cannot differ between stages (the run has one "
                          f"{refused[0]}); a stage may override train.{', train.'.join(STAGE_TRAIN_KEYS)}")
    sections = {}
    for name, cls in SECTIONS.items():
        merged = {**dataclasses.asdict(getattr(cfg, name)), **getattr(stage, name)}
        sections[name] = from_dict(cls, merged, prefix=f"{prefix}.{name}.")
    return dataclasses.replace(cfg, **sections, patch=PatchConfig(), growth=GrowthConfig())
