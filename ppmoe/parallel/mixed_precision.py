"""Mixed precision the FSDP2 way: the data-parallel wrapper casts, not autocast.

Under bf16 compute, `fully_shard` (or `replicate` for dp_type ddp) gets a MixedPrecisionPolicy:
- param_dtype bf16: each block's parameters are all-gathered (cast) to bf16 for its forward and backward,
  so matmuls run in bf16 and activations are saved in bf16;
- reduce_dtype (train.reduce_dtype): gradients are reduced in fp32 (default) or bf16 and land in the
  fp32 sharded parameters' .grad; accumulation over micro-batches without a reduction also runs in it;
- the sharded parameters stay fp32: they are the master weights AdamW updates, and its moments are fp32.
What keeps fp32 where precision matters: the router's gate matmul and softmax (ppmoe.moe.router), RoPE
(ppmoe.layers.apply_rotary), the cross-entropy (ppmoe.model.loss casts the logits), RMSNorm's statistic
(F.rms_norm normalises in fp32 and rounds once, as torchtitan's RMSNorm does), and attention's softmax
inside SDPA's fused kernels. Experts that a layout hands to one data-parallel rank (ignored by the
wrapper, so not cast) run in their input's dtype (ppmoe.moe.experts).

With one data-parallel rank the wrapper is still applied under bf16 (over the 1-rank dp mesh: no
communication, FSDP2 copies instead of reducing), rather than falling back to torch.autocast, so every
layout computes with the same module-level casts and a bf16 run at dp=1 is the reference of dp=2 up to
summation order (tested). Under fp32 nothing changes: no policy, and no wrapper at dp=1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.fsdp import MixedPrecisionPolicy

from ..config import compute_dtype, reduction_dtype

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Precision:
    """compute: the dtype of the parameters' working copies (hence of matmuls and saved activations);
    reduce: the dtype of the data-parallel gradient reduction. Master weights are fp32 either way."""

    compute: torch.dtype = torch.float32
    reduce: torch.dtype = torch.float32

    @property
    def mixed(self) -> bool:
        """True when compute is below fp32: the data-parallel wrapper must then be applied to cast."""
        return self.compute != torch.float32

    def policy(self) -> MixedPrecisionPolicy:
        """FSDP2's policy: the default (no casts at all) under fp32, so the fp32 path is unchanged."""
        if not self.mixed:
            return MixedPrecisionPolicy()
        # Forward inputs are not cast: every activation is bf16 already (each weight that makes one is), and
        # the RoPE tables each block receives must stay fp32 (torchtitan passes complex freqs_cis, which
        # FSDP2 does not cast; ours are real cos/sin tables, which it would round to bf16).
        return MixedPrecisionPolicy(param_dtype=self.compute, reduce_dtype=self.reduce, cast_forward_inputs=False)

    def describe(self) -> str:
        if not self.mixed:
            return "fp32"
        return f"{str(self.compute).removeprefix('torch.')} compute, fp32 master weights, " \
               f"{str(self.reduce).removeprefix('torch.')} gradient reduction"


FULL_PRECISION = Precision()


def resolve_precision(dtype: str, reduce: str, device_type: str) -> Precision:
    """train.dtype and train.reduce_dtype on `device_type` ('auto' is bf16 on CUDA, fp32 elsewhere)."""
    return Precision(DTYPES[compute_dtype(dtype, device_type)], DTYPES[reduction_dtype(dtype, reduce, device_type)])
