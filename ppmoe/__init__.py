"""ppmoe: pretraining Mixture-of-Experts language models with Pipeline-MoE, 3D parallelism,
patch-level training and progressive growth."""

__version__ = "0.1.0"
