"""The plan of a run: a list of stages, each with its model shape, patch size K, parallel layout, batch,
steps and learning-rate schedule. The trainer asks the plan only which stage a step belongs to and what
its learning rate is; everything a stage changes is built per stage (stage_runtime.py).

Where the stages come from:
- `growth.stages` (CompoundGrow): stage s gets share_s of the budget, counted as growth.split says
  (FLOPs by default: `train.steps` is the budget in final-model steps, so a growth run and its full-size
  baseline spend the same FLOPs); the last stage takes what is left.
- `patch.size` / `patch.fraction` (patch-level training): a 'patch' stage and a 'token' stage of the
  same model, the patch stage seeing `patch.fraction` of the tokens (patchtrain.schedule).
- neither: one stage, 'main'.
A stage boundary is a checkpoint, then (when the parameter shapes change) the growth transform, then a
rebuild of the next stage from that checkpoint.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from patchtrain import patch_phase_steps

from ..config import ConfigError, ExperimentConfig, stage_configs
from ..model import GPTShape, model_shape, parameter_shapes, training_flops_per_token
from .optim import lr_at


@dataclass(frozen=True)
class Stage:
    """Optimizer steps start+1 .. start+steps (1-based, inclusive) of the run."""

    index: int
    name: str
    start: int
    steps: int
    cfg: ExperimentConfig  # this stage's config: an ordinary single-stage config (model, moe, train, parallel)
    shape: GPTShape
    patch_size: int
    warmup_steps: int  # of a per-stage schedule
    grows: bool  # entering this stage maps the previous stage's parameters to new shapes
    reset_optimizer: bool  # entering this stage starts a fresh optimizer
    phase: str  # 'patch' or 'token' level (metrics records' `phase`; the patch.* plan's first stage is 'patch')
    flops_per_step: float  # training FLOPs of one optimizer step at this stage's shape and batch
    tokens_per_step: int

    @property
    def end(self) -> int:
        return self.start + self.steps


@dataclass(frozen=True)
class StagePlan:
    stages: tuple[Stage, ...]
    schedule: Literal["global", "per_stage"]
    rewarm_steps: int

    @property
    def total_steps(self) -> int:
        return self.stages[-1].end

    def stage_for_step(self, step: int) -> Stage:
        """The stage that runs 1-based optimizer step `step` (the last stage past the end)."""
        for stage in self.stages:
            if step <= stage.end:
                return stage
        return self.stages[-1]

    def lr(self, step: int) -> float:
        """Learning rate of 1-based step `step`. 'global': one warmup + cosine over all steps (the stage's lr
        and min_lr as peak and floor), ramped up again over rewarm_steps after a boundary that reset the
        optimizer (fresh Adam moments take large normalised steps); 'per_stage': each stage its own."""
        stage = self.stage_for_step(step)
        train = stage.cfg.train
        if self.schedule == "per_stage":
            local = dataclasses.replace(train, steps=stage.steps, warmup_steps=min(stage.warmup_steps, stage.steps))
            return lr_at(step - stage.start, local)
        whole = dataclasses.replace(train, steps=self.total_steps, warmup_steps=self.stages[0].warmup_steps)
        lr = lr_at(step, whole)
        if stage.index and stage.reset_optimizer and self.rewarm_steps:
            lr *= min(1.0, (step - stage.start) / self.rewarm_steps)
        return lr

    @property
    def chunked_data(self) -> bool:
        """Whether stages read windows of different lengths (patch stages, or a shorter seq_len), so the data
        order is cut in chunks (ppmoe.data.ChunkedLoader) rather than ordinary samples."""
        return len({(s.patch_size, s.cfg.train.seq_len) for s in self.stages}) > 1

    @property
    def chunk_len(self) -> int:
        """Tokens of the longest sample of any stage: K * (T + 1)."""
        return max(s.patch_size * (s.cfg.train.seq_len + 1) for s in self.stages)


def flops_per_step(cfg: ExperimentConfig, shape: GPTShape) -> float:
    """A step of B sequences of T positions (tokens, or patches: the same compute)."""
    t = cfg.train
    return training_flops_per_token(shape, t.seq_len) * t.global_batch_size * t.seq_len


def make_stage(index: int, name: str, start: int, steps: int, cfg: ExperimentConfig, shape: GPTShape,
               patch_size: int, warmup_steps: int, grows: bool, reset_optimizer: bool, phase: str = "") -> Stage:
    phase = phase or ("patch" if patch_size > 1 else "token")
    return Stage(index, name, start, steps, cfg, shape, patch_size, warmup_steps, grows, reset_optimizer, phase,
                 flops_per_step(cfg, shape), cfg.train.global_batch_size * cfg.train.seq_len * patch_size)


def stage_layouts(cfg: ExperimentConfig) -> list[tuple[str, ExperimentConfig, int]]:
    """(name, config, patch size) of each stage, in order (see the module docstring): what the stages are,
    before their steps and shapes (which need the dataset's vocabulary) are worked out."""
    if cfg.growth.stages:
        return [(s.name, c, s.patch_size) for s, c in zip(cfg.growth.stages, stage_configs(cfg))]
    t, p = cfg.train, cfg.patch
    if patch_phase_steps(t.steps, p.size, p.fraction):
        return [("patch", cfg, p.size), ("token", cfg, 1)]
    return [("main", cfg, 1)]


def stage_windows(cfg: ExperimentConfig) -> list[tuple[int, int]]:
    """(tokens a loader reads per sample, sequences per batch) of each stage: what the data must hold."""
    return [(k * (c.train.seq_len + 1), c.train.global_batch_size) for _, c, k in stage_layouts(cfg)]


def build_stage_plan(cfg: ExperimentConfig, vocab_size: int | None, device_type: str = "cpu") -> StagePlan:
    """The run's stages (see the module docstring); `vocab_size` from the prepared dataset fills a null
    model.vocab_size. Raises ConfigError when a share is too small to get a step."""
    if cfg.growth.stages:
        return growth_plan(cfg, vocab_size, device_type)
    return patch_plan(cfg, model_shape(cfg, vocab_size, device_type))


def patch_plan(cfg: ExperimentConfig, shape: GPTShape) -> StagePlan:
    t, p = cfg.train, cfg.patch
    layouts = stage_layouts(cfg)
    if len(layouts) == 1:
        return StagePlan((make_stage(0, "main", 0, t.steps, cfg, shape, 1, t.warmup_steps, False, False),),
                         "global", 0)
    patch_steps = patch_phase_steps(t.steps, p.size, p.fraction)
    token_warmup = t.warmup_steps if p.token_warmup_steps is None else p.token_warmup_steps
    stages = (make_stage(0, "patch", 0, patch_steps, cfg, shape, p.size, t.warmup_steps, False, False, "patch"),
              make_stage(1, "token", patch_steps, t.steps - patch_steps, cfg, shape, 1, token_warmup, False,
                         p.reset_optimizer))
    return StagePlan(stages, "per_stage" if p.reset_schedule else "global", 0)


def stage_costs(split: str, configs: list[ExperimentConfig], shapes: list[GPTShape], patch_sizes: list[int]
                ) -> list[float]:
    """What one step of each stage costs in the unit the shares count."""
    if split == "flops":
        return [flops_per_step(c, s) for c, s in zip(configs, shapes)]
    if split == "tokens":
        return [c.train.global_batch_size * c.train.seq_len * k for c, k in zip(configs, patch_sizes)]
    return [1.0] * len(configs)


def growth_plan(cfg: ExperimentConfig, vocab_size: int | None, device_type: str) -> StagePlan:
    growth = cfg.growth
    layouts = stage_layouts(cfg)
    configs, patch_sizes = [c for _, c, _ in layouts], [k for _, _, k in layouts]
    shapes = [model_shape(c, vocab_size, device_type) for c in configs]
    costs = stage_costs(growth.split, configs, shapes, patch_sizes)
    budget = cfg.train.steps * costs[-1]  # train.steps steps of the final stage
    steps, spent = [], 0.0
    for index, stage in enumerate(growth.stages):
        last = index == len(growth.stages) - 1
        count = round((budget - spent) / costs[index]) if last else round(stage.share * budget / costs[index])
        if count < 1:
            raise ConfigError(f"growth.stages.{index} ({stage.name}) gets {count} steps of the budget "
                              f"(train.steps={cfg.train.steps}, split by {growth.split}): raise its share or "
                              f"train.steps")
        steps.append(count)
        spent += count * costs[index]
    param_shapes = [parameter_shapes(s) for s in shapes]
    stages, start = [], 0
    for index, (name, config, patch_size) in enumerate(layouts):
        grows = index > 0 and param_shapes[index] != param_shapes[index - 1]
        stages.append(make_stage(index, name, start, steps[index], config, shapes[index], patch_size,
                                 config.train.warmup_steps, grows, index > 0 and growth.optimizer == "reset"))
        start += steps[index]
    rewarm = cfg.train.warmup_steps if growth.rewarm_steps is None else growth.rewarm_steps
    return StagePlan(tuple(stages), growth.schedule, rewarm)


def describe(plan: StagePlan) -> str:
    """One line per stage, for the start of a run's log."""
    lines = []
    for s in plan.stages:
        m, p = s.shape, s.cfg.parallel
        experts = f", {m.moe.num_experts} experts top-{m.moe.top_k}" if m.moe else ""
        patch = f", patches of {s.patch_size}" if s.patch_size > 1 else ""
        lines.append(f"  stage {s.index} {s.name!r}: steps {s.start + 1}-{s.end} ({s.steps}), {m.n_layers} layers "
                     f"d_model {m.d_model}{experts}{patch}, tp {p.tp} pp {p.pp}, "
                     f"{s.flops_per_step * s.steps:.3g} FLOPs")
    return "\n".join(lines)
