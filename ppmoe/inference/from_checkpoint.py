"""A trained model for generation: the checkpoint's weights in a plain GPT of its serving shape."""

from __future__ import annotations

import dataclasses

import torch

from ..interop.checkpoint_source import CheckpointSource, read_model_state
from ..model import GPT, build_model
from ..moe.experts import resolve_kernel
from .serving import serving_shape


def load_for_generation(source: CheckpointSource, device: torch.device) -> GPT:
    """The whole model on `device`, in eval mode, dropless (serving_shape), with the expert kernel the
    device runs best ('auto' resolved for it: the checkpoint names the one its training device used)."""
    shape = serving_shape(source.record.shape)
    if shape.moe is not None:
        kernel = resolve_kernel("auto", device.type, shape.d_model, shape.moe.expert_hidden)
        shape = dataclasses.replace(shape, moe=dataclasses.replace(shape.moe, expert_kernel=kernel))
    model = build_model(shape, seed=0)
    model.load_state_dict(read_model_state(source.path, source.record.shape))
    return model.to(device).eval()
