"""ParallelDims: the tp x pp x dp split of the world, checked, and its device mesh."""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ..config.loader import ConfigError


@dataclass(frozen=True)
class ParallelDims:
    """Sizes of each parallel dimension. Ranks are laid out (pp, dp, tp) with tp fastest, so a TP group
    is made of neighbouring ranks (one node, NVLink) and DP/PP cross nodes."""

    tp: int
    pp: int
    dp: int
    world_size: int

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "dp"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        if self.tp * self.pp * self.dp != self.world_size:
            raise ConfigError(
                f"tp * pp * dp = {self.tp} * {self.pp} * {self.dp} = {self.tp * self.pp * self.dp} does not "
                f"match the world size {self.world_size}; launch that many processes or change parallel.*"
            )

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """A 3D mesh named ('pp', 'dp', 'tp'); slice it by name (mesh['tp']) to get each group."""
        return init_device_mesh(device_type, (self.pp, self.dp, self.tp), mesh_dim_names=("pp", "dp", "tp"))
