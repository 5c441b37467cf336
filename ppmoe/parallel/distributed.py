"""Process-group start-up: the same code path for one process and for torchrun/srun launches."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Runtime:
    """Where this process runs: its rank, the world, its device and the backend in use."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# The CUDA caching allocator's settings variable (PYTORCH_ALLOC_CONF is torch's newer, device-neutral name).
ALLOC_CONF_VARIABLES = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
EXPANDABLE_SEGMENTS = "expandable_segments:True"


def allocator_settings(environ: dict[str, str]) -> str | None:
    """The CUDA allocator settings ppmoe applies: expandable segments, unless the user set either variable
    (their choice wins, whatever it says). Expandable segments grow one virtual mapping instead of caching
    many fixed-size blocks, so the varying sizes of a training step (MoE token counts, the last
    micro-batch, pipeline buffers) do not fragment memory into blocks no request fits: fewer
    out-of-memory errors with free memory left, and fewer cudaMalloc/cudaFree calls."""
    if any(name in environ for name in ALLOC_CONF_VARIABLES):
        return None
    return EXPANDABLE_SEGMENTS


def configure_cuda_allocator() -> None:
    """Apply allocator_settings at process start, before this process allocates on the GPU: through the
    environment (read when the allocator starts, and inherited by child processes such as the compiler's
    workers) and, for an allocator something already started, through torch's runtime setter."""
    settings = allocator_settings(os.environ)
    if settings is None:
        return
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = settings
    set_settings = getattr(torch.cuda.memory, "_set_allocator_settings", None)
    if set_settings is not None:
        set_settings(settings)


def init_distributed() -> Runtime:
    """Join (or create) the default process group. NCCL on GPU, gloo on CPU, chosen automatically.
    Run without a launcher, this is a world of one process backed by an in-memory store. On GPU the
    caching allocator uses expandable segments unless PYTORCH_CUDA_ALLOC_CONF says otherwise."""
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        configure_cuda_allocator()
        device, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, rank=rank, world_size=world_size, device_id=device if backend == "nccl" else None)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return Runtime(dist.get_rank(), local_rank, dist.get_world_size(), device, backend)


def shutdown(wait_for_all: bool = False) -> None:
    """Leave the process group. `wait_for_all` (after a run every rank finished): meet the other ranks
    first, so no rank tears gloo down while another's last collective is still in flight (seen as
    'terminate called without an active exception' in ~5% of torchrun exits without it)."""
    if dist.is_initialized():
        if wait_for_all and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()
