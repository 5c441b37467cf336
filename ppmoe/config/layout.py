"""How a stage's work is split: the tp x pp x dp split of the world (ParallelDims) and the split of each
optimizer step's batch over ranks and micro-batches (BatchLayout). Both are worked out once from the
config and the world size (`resolve_layout`), checked when they are made, and passed to whatever needs
a size: the mesh, the runners, the pipeline schedule, the MoE layers' aux-loss scale.

Plain numbers, no torch: the config checks use them too (validate.py), before anything is built.
"""

from __future__ import annotations

from dataclasses import dataclass

from .loader import ConfigError
from .schema import ExperimentConfig


@dataclass(frozen=True)
class ParallelDims:
    """Sizes of each parallel dimension. Ranks are laid out (pp, dp, tp) with tp fastest, so a TP group
    is made of neighbouring ranks (one node, NVLink) and DP/PP cross nodes (ppmoe.parallel.build_mesh)."""

    tp: int
    pp: int
    dp: int
    world_size: int

    def __post_init__(self) -> None:
        # tp, pp >= 1 are ParallelConfig.check's; dp is only known here (null: derived from the world)
        if self.dp < 1:
            raise ConfigError(f"parallel.dp must be >= 1, got {self.dp}")
        if self.tp * self.pp * self.dp != self.world_size:
            raise ConfigError(
                f"parallel.tp * parallel.pp * parallel.dp = {self.tp} * {self.pp} * {self.dp} = "
                f"{self.tp * self.pp * self.dp}, but the world size is {self.world_size}; launch that many "
                f"processes (torchrun --nproc-per-node ...) or set parallel.dp: null to derive it"
            )


# Micro-batch counts pipeline schedules need beyond `pp` (torch.distributed.pipelining refuses others):
# the interleaved schedules run rounds of pp micro-batches, DualPipeV at least one per stage (2 pp).
MULTIPLE_OF_PP_SCHEDULES = ("interleaved_1f1b", "interleaved_zb")
TWICE_PP_SCHEDULES = ("dualpipev",)


@dataclass(frozen=True)
class BatchLayout:
    """One optimizer step's batch: `global_batch` sequences over `dp` data-parallel ranks, each rank's
    share run as `micro_batches` micro-batches of `micro_batch` sequences (accumulated; under pipeline
    parallelism these are the pipeline's micro-batches, so a pipeline needs at least `pp` of them, and
    `pp_schedule` may ask for more)."""

    global_batch: int
    micro_batch: int
    dp: int
    pp: int = 1
    pp_schedule: str = "1f1b"

    def __post_init__(self) -> None:
        if self.global_batch % (self.micro_batch * self.dp):
            raise ConfigError(
                f"train.global_batch_size={self.global_batch} must be divisible by train.micro_batch_size * dp "
                f"= {self.micro_batch} * {self.dp}; change one of them"
            )
        if self.pp > 1:
            self.check_pipeline_microbatches()

    def check_pipeline_microbatches(self) -> None:
        got = (f"the pipeline gets {self.micro_batches} micro-batches per step (global_batch_size / "
               f"(micro_batch_size * dp))")
        fix = "lower train.micro_batch_size or raise train.global_batch_size"
        multiple = self.pp_schedule in MULTIPLE_OF_PP_SCHEDULES
        if self.micro_batches < self.pp or (multiple and self.micro_batches % self.pp):
            raise ConfigError(f"{got}; it needs at least parallel.pp={self.pp}"
                              + (f" and a multiple of it for {self.pp_schedule}" if multiple else "") + f": {fix}")
        if self.pp_schedule in TWICE_PP_SCHEDULES and self.micro_batches < 2 * self.pp:
            raise ConfigError(f"{got}; {self.pp_schedule} needs at least one per stage, 2 * parallel.pp = "
                              f"{2 * self.pp}: {fix}")

    @property
    def local_batch(self) -> int:
        """Sequences per step on one data-parallel rank."""
        return self.global_batch // self.dp

    @property
    def micro_batches(self) -> int:
        """Micro-batches per step on each rank (gradient accumulation, and the pipeline's micro-batches)."""
        return self.local_batch // self.micro_batch

    @property
    def loss_scale(self) -> float:
        """Factor of each micro-batch's loss: a step's gradient is that of the mean over the rank's batch
        whatever the accumulation. The main loss is divided by micro_batches (the same value); the MoE
        aux losses, attached inside the model, are multiplied by this (ppmoe.model.build_model)."""
        return self.micro_batch / self.local_batch


def resolve_dp(cfg: ExperimentConfig, world_size: int) -> int:
    """The data-parallel size: parallel.dp if set, else world_size / (tp * pp)."""
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    if cfg.parallel.dp is not None:
        return cfg.parallel.dp
    if world_size % (tp * pp):
        raise ConfigError(
            f"world size {world_size} is not divisible by parallel.tp * parallel.pp = {tp} * {pp}; "
            f"launch a multiple of {tp * pp} processes or change tp/pp"
        )
    return world_size // (tp * pp)


def resolve_dims(cfg: ExperimentConfig, world_size: int) -> ParallelDims:
    """The stage config `cfg`'s parallel split on `world_size` processes."""
    par = cfg.parallel
    return ParallelDims(tp=par.tp, pp=par.pp, dp=resolve_dp(cfg, world_size), world_size=world_size)


def batch_layout(cfg: ExperimentConfig, dims: ParallelDims) -> BatchLayout:
    """The stage config `cfg`'s batch split over `dims`."""
    t = cfg.train
    return BatchLayout(global_batch=t.global_batch_size, micro_batch=t.micro_batch_size, dp=dims.dp, pp=dims.pp,
                       pp_schedule=cfg.parallel.pp_schedule)


def resolve_layout(cfg: ExperimentConfig, world_size: int) -> tuple[ParallelDims, BatchLayout]:
    """The stage config `cfg` on `world_size` processes: its parallel split and its batch split."""
    dims = resolve_dims(cfg, world_size)
    return dims, batch_layout(cfg, dims)
