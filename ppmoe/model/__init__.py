"""The GPT model in plain PyTorch, its building blocks and its FLOPs."""

from .build import build_model, model_shape
from .flops import peak_flops_per_device, training_flops_per_token
from .gpt import GPT, GPTShape

__all__ = ["GPT", "GPTShape", "build_model", "model_shape", "training_flops_per_token", "peak_flops_per_device"]
