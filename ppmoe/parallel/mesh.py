"""The device mesh of a stage's parallel split."""

from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ..config.layout import ParallelDims


def build_mesh(dims: ParallelDims, device_type: str) -> DeviceMesh:
    """A 3D mesh named ('pp', 'dp', 'tp'), tp fastest; slice it by name (mesh['tp']) to get each group."""
    return init_device_mesh(device_type, (dims.pp, dims.dp, dims.tp), mesh_dim_names=("pp", "dp", "tp"))
