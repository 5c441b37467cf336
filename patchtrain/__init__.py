"""patchtrain: patch-level training (Shao et al., 2024) for ppmoe models, in any parallel layout.

embedding.py  patch input (mean of K token embeddings), a hook applied from outside
loss.py       next-patch loss (one shared log-softmax for the K targets), reference and layout factory
kernels/      the fused triton K-target cross-entropy
data.py       K*T-token windows and next-patch targets
loader.py     one chunked data order for both phases (the token phase reads what the patch phase did not)
schedule.py   the phase plan (lambda of the tokens at patch level) and per-phase learning rates
phase_io.py   what a phase changes in the trainer: input hooks, loss, data windows
"""

from .data import patch_window_len, to_patch_batch
from .embedding import enable_patch_input, mean_pool_patches
from .loss import build_patch_loss, patch_cross_entropy
from .schedule import Phase, PhasePlan, build_plan

__all__ = ["patch_window_len", "to_patch_batch", "enable_patch_input", "mean_pool_patches", "build_patch_loss",
           "patch_cross_entropy", "Phase", "PhasePlan", "build_plan"]
