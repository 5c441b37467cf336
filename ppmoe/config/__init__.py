"""Experiment configuration: schema, loading with overrides, validation."""

from .loader import ConfigError, load_config, save_config, to_dict
from .schema import (CheckpointConfig, DataConfig, ExperimentConfig, LoggingConfig, ModelConfig, MoEConfig, PatchConfig,
                     ParallelConfig, TrainConfig)
from .validate import derived_ffn_hidden, padded_vocab_size, validate

__all__ = [
    "ConfigError", "load_config", "save_config", "to_dict", "validate", "derived_ffn_hidden",
    "padded_vocab_size", "ExperimentConfig", "ModelConfig", "ParallelConfig", "TrainConfig", "DataConfig",
    "CheckpointConfig", "LoggingConfig", "MoEConfig", "PatchConfig",
]
