"""Text generation from a trained GPT: a KV cache, the cached forward, sampling, `generate`.

Supported: the plain model (ppmoe.model.GPT as build_model returns it, no tensor, pipeline or expert
parallelism applied) on one process, on CPU or one GPU. The cached forward runs the model's own modules
layer by layer and keeps the keys/values it has computed, so each new token costs one position's work
instead of the whole sequence's.

Load a model for generation with `serving_shape(shape)` (a dropless MoE): with moe.capacity_factor set,
which tokens an expert drops depends on how many tokens are routed together, so decoding one token at a
time would not be the model the full forward computes.
"""

from .forward import forward_with_cache
from .generate import generate
from .kv_cache import KVCache
from .sampling import token_picker
from .serving import serving_shape

__all__ = ["KVCache", "forward_with_cache", "generate", "serving_shape", "token_picker"]
