"""`python -m ppmoe.launch.torchrun ...` is torchrun whose agent ignores SIGUSR1.

Under SLURM the preemption warning (SIGUSR1) is delivered to every process of the job step. The
training ranks handle it (finish the step, save a checkpoint, exit 0); the torchrun agent must not die
from it first (SIGUSR1's default action is to terminate). An ignored signal stays ignored across exec,
and the ranks install their own handler (ppmoe.train.signals), so only the agent is affected.
"""

import signal

from torch.distributed.run import main

if __name__ == "__main__":
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    main()
