"""Experiment configuration: schema, loading with overrides, validation."""

from .layout import BatchLayout, ParallelDims, resolve_layout
from .loader import ConfigError, load_config, save_config, to_dict
from .precision import compute_dtype, reduction_dtype
from .schema import (CheckpointConfig, DataConfig, ExperimentConfig, GrowthConfig, GrowthOpsConfig, LoggingConfig,
                     ModelConfig, MoEConfig, ParallelConfig, PatchConfig, StageConfig, TrainConfig)
from .sizes import derived_ffn_hidden, padded_vocab_size
from .stages import stage_configs
from .validate import validate
from .growth_rules import check_growth

__all__ = [
    "BatchLayout", "ParallelDims", "resolve_layout", "ConfigError", "load_config", "stage_configs", "check_growth", "save_config", "to_dict", "validate", "derived_ffn_hidden",
    "padded_vocab_size", "compute_dtype", "reduction_dtype", "ExperimentConfig", "ModelConfig", "ParallelConfig", "TrainConfig", "DataConfig",
    "CheckpointConfig", "LoggingConfig", "MoEConfig", "PatchConfig", "GrowthConfig", "GrowthOpsConfig", "StageConfig",
]
