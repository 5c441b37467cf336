"""Growth operators: pure functions from an old model's full state dict to a grown model's.

`growth_map` gives each tensor of the grown model a Recipe (which old tensor, which structural steps,
which scales, whether it preserves the function); `build_weight` / `build_moment` build one tensor from
its recipe, `apply_growth` the whole state dict. Operator families: depth, width, ffn, experts. `grow_checkpoint` (transform.py) runs them inside a job,
checkpoint to checkpoint, with the keys partitioned over all ranks.
"""

from .build import apply_growth, build_moment, build_weight, key_generator
from .growth_map import growth_map
from .recipe import Recipe, growth_is_exact
from .transform import GrowthReport, GrowthSpec, grow_checkpoint, partition_keys

__all__ = ["Recipe", "apply_growth", "build_moment", "build_weight", "growth_is_exact", "growth_map",
           "key_generator", "GrowthReport", "GrowthSpec", "grow_checkpoint", "partition_keys"]
