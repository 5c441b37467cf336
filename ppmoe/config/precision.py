"""The compute precision a run resolves to on its device (plain strings, no torch): shared by the model
builder (the expert kernel depends on it) and the data-parallel wrapper (ppmoe.parallel.mixed_precision)."""

from __future__ import annotations


def compute_dtype(dtype: str, device_type: str) -> str:
    """train.dtype on a device: 'bf16' or 'fp32'. 'auto' is bf16 on CUDA and fp32 elsewhere (CPU bf16
    matmuls are slow and the CPU tests compare layouts to fp32 rounding)."""
    if dtype == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    return dtype


def reduction_dtype(dtype: str, reduce: str, device_type: str) -> str:
    """train.reduce_dtype on a device: the data-parallel gradient reduction runs in it under bf16 compute;
    under fp32 compute it is fp32 (a bf16 reduction of fp32 gradients would only lose bits: the config
    refuses train.dtype fp32 with reduce_dtype bf16, and 'auto' on CPU resolves to fp32 here)."""
    return reduce if compute_dtype(dtype, device_type) == "bf16" else "fp32"
