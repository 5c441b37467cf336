"""How many optimizer steps the patch phase gets (the `patch.*` config: two stages, patch then token).

`train.steps` is the number of optimizer steps of the whole run. A patch step reads K times the tokens
of a token step at the same cost (seq_len positions either way), so for the patch phase to see the share
lambda of all tokens it takes  s_p = steps * (lambda/K) / (lambda/K + 1 - lambda)  steps (rounded), the
token phase the rest. Relative to token-level training on the same tokens the run costs
lambda/K + (1 - lambda) (0.5x at K=4, lambda=2/3).
"""

from __future__ import annotations


def patch_phase_steps(steps: int, size: int, fraction: float) -> int:
    """Optimizer steps of the patch phase (0 when fraction is 0); the token phase keeps at least one."""
    if fraction == 0.0:
        return 0
    share = (fraction / size) / (fraction / size + 1.0 - fraction)
    return max(1, min(steps - 1, round(steps * share)))
