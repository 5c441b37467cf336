"""The GPT model in plain PyTorch, its building blocks and its FLOPs."""

from .build import build_model, count_parameters, model_shape, parameter_shapes
from .flops import peak_flops_per_device, training_flops_per_token
from .gpt import GPT, GPTShape

__all__ = ["GPT", "GPTShape", "build_model", "model_shape", "count_parameters", "parameter_shapes", "training_flops_per_token", "peak_flops_per_device"]
