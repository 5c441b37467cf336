"""Graceful stop: SIGTERM (torchrun forwarding a Ctrl-C, SLURM before the time limit) asks the loop to
save a checkpoint and exit at the end of the current step instead of dying mid-step."""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist


class StopRequest:
    """Records SIGTERM/SIGUSR1; `agreed()` makes every rank see a stop that any rank received."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGUSR1)):
        self.requested = False
        self.previous = {}
        for sig in signals:
            self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def agreed(self, device: torch.device) -> bool:
        """All-reduce (max) of the flag, so ranks stop at the same step (a collective: call on all ranks)."""
        flag = torch.tensor(float(self.requested), device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
