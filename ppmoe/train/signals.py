"""Graceful stop: SIGTERM (SLURM before the time limit, a scheduler), SIGUSR1 (SLURM's preemption warning,
see ppmoe.launch.slurm) and SIGINT (Ctrl-C; torchrun forwards it to the ranks) ask the loop to save a
checkpoint and exit at the end of the current step instead of dying mid-step. A second Ctrl-C stops at
once (Python's KeyboardInterrupt), without saving.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopRequest:
    """Records the stop signals; `agreed()` makes every rank see a stop that any rank received."""

    def __init__(self, signals=STOP_SIGNALS, announce=print):
        self.requested = False
        self.announce = announce
        self.previous = {}
        for sig in signals:
            self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True
        if signum == signal.SIGINT:
            # The next Ctrl-C is Python's default: KeyboardInterrupt, at once.
            signal.signal(signal.SIGINT, signal.default_int_handler)
            self.announce("Ctrl-C: finishing this step and saving a checkpoint (Ctrl-C again to stop at once, "
                          "without saving)")

    def agreed(self, device: torch.device) -> bool:
        """All-reduce (max) of the flag, so ranks stop at the same step (a collective: call on all ranks)."""
        flag = torch.tensor(float(self.requested), device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
