"""Launch helpers: torchrun under SLURM (sbatch script generation, preemption-aware agent)."""
