"""The phase plan: which optimizer steps run at patch level and which at token level.

`train.steps` is the number of optimizer steps of the whole run. A patch step reads K times the tokens
of a token step at the same cost (seq_len positions either way), so for the patch phase to see the share
lambda of all tokens it takes  s_p = steps * (lambda/K) / (lambda/K + 1 - lambda)  steps (rounded), the
token phase the rest. Relative to token-level training on the same tokens the run costs
lambda/K + (1 - lambda) (0.5x at K=4, lambda=2/3).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ppmoe.config import ExperimentConfig, TrainConfig


@dataclass(frozen=True)
class Phase:
    """Steps start+1 .. start+steps (1-based, inclusive) run with patches of `patch_size` tokens."""

    name: str  # "patch" | "token"
    start: int
    steps: int
    patch_size: int
    warmup_steps: int

    @property
    def end(self) -> int:
        return self.start + self.steps


@dataclass(frozen=True)
class PhasePlan:
    phases: tuple[Phase, ...]
    reset_schedule: bool

    def phase_for_step(self, step: int) -> Phase:
        """The phase that runs 1-based optimizer step `step`."""
        for phase in self.phases:
            if step <= phase.end:
                return phase
        return self.phases[-1]

    def lr(self, step: int, train: TrainConfig) -> float:
        """Learning rate of step `step`: each phase its own warmup + cosine, or one schedule for all."""
        from ppmoe.train.optim import lr_at

        if not self.reset_schedule:
            return lr_at(step, train)
        phase = self.phase_for_step(step)
        local = dataclasses.replace(train, steps=phase.steps, warmup_steps=min(phase.warmup_steps, phase.steps))
        return lr_at(step - phase.start, local)


def patch_phase_steps(steps: int, size: int, fraction: float) -> int:
    if fraction == 0.0:
        return 0
    share = (fraction / size) / (fraction / size + 1.0 - fraction)
    return max(1, min(steps - 1, round(steps * share)))


def build_plan(cfg: ExperimentConfig) -> PhasePlan:
    t, p = cfg.train, cfg.patch
    patch_steps = patch_phase_steps(t.steps, p.size, p.fraction)
    token_warmup = t.warmup_steps if p.token_warmup_steps is None else p.token_warmup_steps
    phases = []
    if patch_steps:
        phases.append(Phase("patch", 0, patch_steps, p.size, t.warmup_steps))
    phases.append(Phase("token", patch_steps, t.steps - patch_steps, 1, token_warmup if patch_steps else t.warmup_steps))
    return PhasePlan(tuple(phases), p.reset_schedule)
