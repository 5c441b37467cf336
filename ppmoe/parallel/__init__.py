"""Parallelism applied to a plain model from outside: mesh, tensor parallel, data parallel."""

from .data_parallel import apply_data_parallel, set_gradient_sync
from .expert_parallel import apply_expert_layout
from .distributed import Runtime, init_distributed, shutdown
from .mesh import build_mesh
from .grad_norm import clip_grad_norm, global_grad_norm
from .tensor_parallel import apply_tensor_parallel

__all__ = ["build_mesh", "Runtime", "init_distributed", "shutdown", "apply_tensor_parallel",
           "apply_data_parallel", "apply_expert_layout", "set_gradient_sync", "clip_grad_norm", "global_grad_norm"]
