"""The shape a model is loaded with for generation."""

from __future__ import annotations

import dataclasses

from ..model import GPTShape


def serving_shape(shape: GPTShape) -> GPTShape:
    """`shape` with a dropless MoE (moe.capacity_factor None); a dense shape comes back unchanged.

    A capacity limit drops assignments depending on the number of tokens routed together (T in
    ceil(capacity_factor * T * k / E)) and on their order, so a forward over the whole sequence and a
    decode of one token at a time would route differently. Dropless routing treats every token on its
    own: the cached and the full forward are then the same function. The weights do not depend on the
    capacity factor, so a checkpoint trained with one loads into this shape as it is.
    """
    if shape.moe is None or shape.moe.capacity_factor is None:
        return shape
    return dataclasses.replace(shape, moe=dataclasses.replace(shape.moe, capacity_factor=None))
