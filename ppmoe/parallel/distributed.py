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


def init_distributed() -> Runtime:
    """Join (or create) the default process group. NCCL on GPU, gloo on CPU, chosen automatically.
    Run without a launcher, this is a world of one process backed by an in-memory store."""
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
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
