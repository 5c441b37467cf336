"""patchtrain: patch-level training (Shao et al., 2024) for ppmoe models, in any parallel layout.

embedding.py       patch input (mean of K token embeddings), a hook applied from outside
loss.py            next-patch loss (one shared log-softmax for the K targets) for a layout
reference_loss.py  the torch reference of that loss (what kernels/ falls back to and is tested against)
kernels/           the fused triton K-target cross-entropy
data.py            K*T-token windows and next-patch targets
schedule.py        the patch phase's share of the steps (patch.fraction of the tokens)
stage_io.py        what a stage's patch size changes in the trainer: input hooks, loss, data windows

A run's stages (patch stages first, then token level) are planned by ppmoe.train.plan; one data order
for all of them is ppmoe.data.ChunkedLoader.
"""

from .data import patch_window_len, to_patch_batch
from .embedding import enable_patch_input, mean_pool_patches
from .loss import build_patch_loss
from .reference_loss import patch_cross_entropy
from .schedule import patch_phase_steps
from .stage_io import StageIO, stage_io

__all__ = ["patch_window_len", "to_patch_batch", "enable_patch_input", "mean_pool_patches", "build_patch_loss",
           "patch_cross_entropy", "patch_phase_steps", "StageIO", "stage_io"]
