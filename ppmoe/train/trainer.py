"""The training loop: plan the stages, build the current one, resume, step, log, checkpoint, and at each
stage boundary hand over to the next stage through a checkpoint."""

from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist

from ..config import ConfigError, ExperimentConfig, check_growth, save_config, validate
from ..data import (TOKENIZER_FILE, check_dataset, check_output_dir, checkpoint_bytes, iter_eval_batches,
                    padded_model_vocab, read_meta)
from ..errors import NonFiniteError
from ..growth import GrowthSpec, grow_checkpoint
from ..model import count_parameters, peak_flops_per_device
from ..model.record import MODEL_RECORD, ModelRecord
from ..parallel import clip_grad_norm, init_distributed
from ..parallel.distributed import Runtime
from .checkpoint import CheckpointManager
from .health import LossSpikeMonitor, NonFiniteGuard, state_is_finite
from .memory_estimate import device_memory, memory_report
from .metrics import MetricsLogger, peak_memory_gib
from .optim import set_lr
from .plan import Stage, StagePlan, build_stage_plan, describe, stage_windows
from .run_dir import RunDirLock, check_resume_config, refuse_fresh_start_over_checkpoints
from .signals import StopRequest
from .stage_runtime import MeshCache, StageRuntime, build_loader, build_stage_runtime

# A growth whose operators all preserve the function should leave the probe loss where it was.
EXACT_PROBE_TOLERANCE = 1e-4


class StepOutcome(NamedTuple):
    loss: torch.Tensor  # this rank's loss
    grad_norm: torch.Tensor  # global
    lr: float
    finite: bool  # False: the update was dropped (train.nonfinite)


@dataclass
class TrainResult:
    """What a finished (or stopped) run reports back to its caller."""

    losses: dict[int, float] = field(default_factory=dict)
    val_losses: dict[int, float] = field(default_factory=dict)
    last_step: int = 0
    stopped_by_signal: bool = False
    tokens_per_sec: float = 0.0
    checkpoint: Path | None = None


class Trainer:
    """Holds everything one run needs; `fit()` runs it. Construction is collective (all ranks)."""

    def __init__(self, cfg: ExperimentConfig, runtime: Runtime | None = None):
        self.rt = runtime or init_distributed()
        validate(cfg, self.rt.world_size)
        self.cfg = cfg
        self.run_dir = Path(cfg.output_dir)
        self.plan = self.check_inputs()  # before anything is written; the same verdict on every rank
        self.lock = RunDirLock(self.run_dir, self.rt.rank)
        self.lock.acquire(self.say)
        self.ckpt = CheckpointManager(cfg.checkpoint.dir or self.run_dir / "checkpoints", cfg.checkpoint.keep,
                                      self.rt.rank)
        self.resume_from = self.checkpoint_to_resume()
        self.init_from = (self.ckpt.check_init_from(cfg.train.init_from, self.plan.stages[0].shape)
                          if cfg.train.init_from and self.resume_from is None else None)
        if self.rt.is_main:  # only now: a refused start never overwrites the record of what the checkpoints hold
            save_config(cfg, self.run_dir / "config.yaml")
        self.meshes = MeshCache(self.rt.world_size, self.rt.device.type)
        self.peak_flops = peak_flops_per_device(cfg.train.peak_flops)
        self.metrics = MetricsLogger(cfg, self.run_dir, self.rt.is_main, self.plan.total_steps,
                                     show_stage=len(self.plan.stages) > 1)
        self.guard = NonFiniteGuard(cfg.train.nonfinite, cfg.train.nonfinite_max)
        self.spikes = LossSpikeMonitor(cfg.train.loss_spike_factor)
        self.step = 0
        self.tokens_seen = 0
        self.flops = 0.0
        self.current: StageRuntime = build_stage_runtime(self.plan, self.plan.stages[0], self.rt, self.meshes,
                                                         self.metrics.info)

    def check_inputs(self) -> StagePlan:
        """The dataset (files, vocabulary, splits long enough) and the disk (writable, room for the checkpoints
        kept), checked before any model is built; returns the plan they were checked against."""
        cfg = self.cfg
        windows = stage_windows(cfg)
        for note in check_dataset(cfg.data.dataset_dir, padded_model_vocab(cfg), windows,
                                  needs_val=cfg.train.val_every > 0 or len(windows) > 1):
            self.say(f"note: {note}")
        self.dataset_meta = read_meta(cfg.data.dataset_dir)
        plan = build_stage_plan(cfg, self.dataset_meta["vocab_size"], self.rt.device.type)
        kept = cfg.checkpoint.keep + 1 if cfg.checkpoint.keep else 2  # the new one is written before pruning
        needed = checkpoint_bytes(max(count_parameters(s.shape) for s in plan.stages), kept)
        check_output_dir(cfg.output_dir, checkpoint_bytes(0) if cfg.checkpoint.dir else needed)
        if cfg.checkpoint.dir:
            check_output_dir(cfg.checkpoint.dir, needed, key="checkpoint.dir")
        return plan

    def say(self, message: str) -> None:
        """A message from rank 0 before the metrics logger exists."""
        if self.rt.is_main:
            print(message, flush=True)

    def checkpoint_to_resume(self) -> Path | None:
        """train.resume: the checkpoint to continue from, checked against this config; None for a fresh start
        (refused where another run's checkpoints are)."""
        resume = self.cfg.train.resume
        if resume == "none":
            refuse_fresh_start_over_checkpoints(self.ckpt.latest(), self.run_dir)
            return None
        # verified against their manifests: a damaged newest checkpoint is skipped, saying why
        path = self.ckpt.latest_good(self.say) if resume == "auto" else self.ckpt.check_explicit(resume, self.say)
        if path is not None:
            check_resume_config(self.run_dir, self.cfg, path)
        return path

    @property
    def model(self) -> torch.nn.Module:
        return self.current.model

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.current.optimizer

    # ---- state -------------------------------------------------------------------------------
    def trainer_state(self, probe_loss: float = 0.0) -> dict:
        """`stage`: the stage whose model the checkpoint holds; `probe_loss`: at a stage boundary, the loss
        on the fixed probe batch just before it (the growth record compares it with the grown model's)."""
        return {"step": self.step, "tokens_seen": self.tokens_seen, "flops": self.flops,
                "data": self.current.loader.state_dict(), "stage": self.current.stage.index,
                "probe_loss": probe_loss}

    def save(self, probe_loss: float = 0.0) -> Path:
        if not state_is_finite(self.model, self.optimizer):
            raise NonFiniteError(f"step {self.step}: the model or optimizer state is not finite; it was not saved, "
                                 f"and {self.last_checkpoint()} holds the last good state: lower train.lr and "
                                 f"resume from it")
        path = self.ckpt.save(self.step, self.model, self.optimizer, self.trainer_state(probe_loss),
                              self.checkpoint_attachments())
        self.metrics.info(f"saved checkpoint {path}")
        return path

    def checkpoint_attachments(self) -> dict[str, bytes]:
        """model.json (what the weights are) and the run's tokenizer.json, so that `ppmoe export` and
        `ppmoe generate` read a checkpoint on its own."""
        stage = self.current.stage
        record = ModelRecord(stage.shape, self.cfg.model.vocab_size or self.dataset_meta["vocab_size"],
                             self.dataset_meta.get("eos_id"), stage.name, stage.patch_size)
        files = {MODEL_RECORD: record.to_json().encode()}
        tokenizer = Path(self.cfg.data.dataset_dir) / TOKENIZER_FILE
        if tokenizer.is_file():
            files[TOKENIZER_FILE] = tokenizer.read_bytes()
        return files

    def last_checkpoint(self) -> str:
        newest = self.ckpt.latest()
        return newest.name if newest is not None else "no checkpoint yet"

    def maybe_resume(self) -> None:
        """Continue from the run's checkpoint, or start from train.init_from's weights (a fresh run: step 0,
        the optimizer and schedule new)."""
        if self.resume_from is not None:
            self.enter_from_checkpoint(self.resume_from)
            self.metrics.info(f"resumed from {self.resume_from} at step {self.step}")
        elif self.init_from is not None:
            self.ckpt.load_weights(self.init_from, self.model)
            self.metrics.info(f"initialised the model from {self.init_from}")

    def roll_back(self) -> None:
        """train.nonfinite=rollback: reload the newest good checkpoint and carry on with the data after the bad
        batches (replaying them would meet the same non-finite steps)."""
        path = self.ckpt.latest_good(self.metrics.info)
        if path is None:
            raise NonFiniteError(f"step {self.step}: non-finite steps and no checkpoint to roll back to: lower "
                                 f"train.lr or raise train.warmup_steps, and set checkpoint.every")
        bad_step, stage, data = self.step, self.current.stage, self.current.loader.state_dict()
        self.enter_from_checkpoint(path)
        if self.current.stage is stage:
            self.current.loader.load_state_dict(data)
        self.metrics.info(f"step {bad_step}: rolled back to {path.name} (step {self.step}); the data continues after "
                          f"the bad batches (rollback {self.guard.rollbacks} of at most {self.guard.limit})")

    # ---- stages ------------------------------------------------------------------------------
    def enter_from_checkpoint(self, path: Path) -> None:
        """Continue from checkpoint `path`: in the stage it was saved in, or, when it was saved at the end of
        a stage, in the next one: grow the weights (checkpoint to checkpoint, when the shapes change),
        build the next stage's layout and load them. A boundary inside a running job goes through here
        too, so a run killed anywhere around a boundary resumes exactly as the uninterrupted run went on."""
        state = self.ckpt.read_trainer_state(path, {**self.trainer_state(), "stage": -1})
        step = int(state["step"])
        # (stage -1: a checkpoint of an older ppmoe, which did not record it; the step tells)
        saved = self.plan.stages[int(state["stage"])] if state["stage"] >= 0 else self.plan.stage_for_step(max(step, 1))
        if self.plan.stage_for_step(max(step, 1)) is not saved:
            raise ConfigError(f"{path} was saved in stage {saved.name!r} at step {step}, but this config's plan has "
                             f"step {step} in stage {self.plan.stage_for_step(step).name!r}: the growth config "
                             f"changed since; resume with the config the run was started with")
        target = self.plan.stage_for_step(step + 1) if step < self.plan.total_steps else saved
        weights, started = path, time.perf_counter()
        report = None
        if target is not saved and target.grows:
            spec = GrowthSpec(saved.shape, target.shape, self.cfg.growth.ops, self.cfg.train.seed, target.name,
                              moments=not target.reset_optimizer)
            report = grow_checkpoint(path, spec, self.rt.rank, self.rt.world_size, self.ckpt.no_dist)
            weights = report.path
        if target is not self.current.stage:  # (resuming into the first stage: the fresh one is built already)
            self.build_stage(target)
        if target is saved or not target.reset_optimizer:
            self.ckpt.load_weights(weights, self.model, self.optimizer, moments_only=report is not None)
        else:
            self.ckpt.load_weights(weights, self.model)
        self.ckpt.restore_rng(path)
        self.step, self.tokens_seen, self.flops = step, int(state["tokens_seen"]), float(state["flops"])
        self.continue_data(saved, state["data"])
        if target is not saved:
            self.log_boundary(saved, target, float(state["probe_loss"]), report, time.perf_counter() - started)

    def build_stage(self, stage: Stage) -> None:
        """Free the current stage's model, optimizer and schedule, then build `stage`."""
        self.current.close()
        self.current = None
        gc.collect()  # pipeline schedules and FSDP hold reference cycles; free the old model before the new
        if self.rt.device.type == "cuda":
            torch.cuda.empty_cache()
        self.current = build_stage_runtime(self.plan, stage, self.rt, self.meshes, self.metrics.info)

    def continue_data(self, saved: Stage, data_state: dict) -> None:
        """Restore the data position saved by stage `saved` (checked against that stage's batch and windows)
        and carry it into the current stage."""
        if saved is self.current.stage:
            self.current.loader.load_state_dict(data_state)
            return
        previous = build_loader(self.plan, saved, 0, 1)
        previous.load_state_dict(data_state)
        self.current.loader.continue_from(previous)

    def probe_loss(self, stage: Stage, rows: int) -> float:
        """Loss of the current model on the fixed probe batch (the first `rows` validation sequences) with
        `stage`'s objective (patch size and sequence length): the same number before and after a growth."""
        rt = self.current
        rt.use_objective(stage.patch_size, stage.cfg.train.seq_len)
        try:
            return self.evaluate(rows // rt.stage.cfg.train.global_batch_size)
        finally:
            rt.use_objective(rt.stage.patch_size, rt.stage.cfg.train.seq_len)

    def probe_rows(self, saved: Stage, target: Stage) -> int:
        """Rows both stages can evaluate in whole global batches."""
        return math.lcm(saved.cfg.train.global_batch_size, target.cfg.train.global_batch_size)

    def log_boundary(self, saved: Stage, target: Stage, probe_before: float, report, seconds: float) -> None:
        probe_after = self.probe_loss(saved, self.probe_rows(saved, target))
        record = {"step": self.step, "event": "growth" if target.grows else "stage", "from_stage": saved.name,
                  "to_stage": target.name, "params_before": count_parameters(saved.shape),
                  "params_after": count_parameters(target.shape), "probe_loss_before": probe_before,
                  "probe_loss_after": probe_after, "boundary_s": seconds}
        if report is not None:
            record.update(exact=report.exact, transform_s=report.seconds)
        self.metrics.log(record)
        moved = abs(probe_after - probe_before) / max(abs(probe_before), 1e-12)
        if report is not None and report.exact and moved > EXACT_PROBE_TOLERANCE:
            self.metrics.info(f"warning: the growth into {target.name!r} preserves the function, yet the probe loss "
                              f"moved by {moved:.2e} relative (expected < {EXACT_PROBE_TOLERANCE:g})")
        if report is not None and not report.exact:
            self.metrics.info(f"growth into {target.name!r} is not function-preserving: {'; '.join(report.notes)}")

    # ---- loop --------------------------------------------------------------------------------
    def evaluate(self, num_batches: int) -> float:
        """Mean loss of the current model over the first `num_batches` global validation batches, with the
        objective in use (the stage's, or the previous stage's for the growth probe)."""
        rt, t, io = self.current, self.current.stage.cfg.train, self.current.io
        batches = iter_eval_batches(self.cfg.data.dataset_dir, "val", io.window, t.global_batch_size, num_batches,
                                    rt.dp_rank, rt.dims.dp)
        for part in rt.runner.parts:
            part.eval()
        losses = [rt.runner.eval_step(*(b.to(self.rt.device) for b in io.to_batch(x, y))) for x, y in batches]
        for part in rt.runner.parts:
            part.train()
        rt.moe.reset()  # evaluation's routing is not training load
        return self.global_mean(torch.stack(losses).mean())

    def validation_loss(self) -> float:
        """Validation loss of the current stage's objective (next-patch loss in a patch stage)."""
        return self.evaluate(self.current.stage.cfg.train.val_batches)

    def global_mean(self, value: torch.Tensor) -> float:
        """The loss of the whole global batch from per-rank values: summed over the pipeline group (only
        the last stage holds it), averaged over the data-parallel group (TP ranks already agree)."""
        rt = self.current
        value = value.clone()
        if rt.pp_group is not None:
            dist.all_reduce(value, group=rt.pp_group)
        if rt.dims.dp > 1:
            dist.all_reduce(value, group=rt.dp_group)
            value /= rt.dims.dp
        return float(value)

    def train_step(self) -> StepOutcome:
        """One optimizer step. A non-finite global gradient norm (any rank's non-finite loss or gradients make
        it so, the same on every rank) drops the update: the optimizer never sees it."""
        rt = self.current
        inputs, targets = rt.io.to_batch(*rt.loader.next_batch())
        lr = self.plan.lr(self.step + 1)
        set_lr(rt.optimizer, lr)
        rt.optimizer.zero_grad(set_to_none=True)
        loss = rt.runner.train_step(inputs.to(self.rt.device), targets.to(self.rt.device))
        grad_norm = clip_grad_norm(rt.model.parameters(), rt.stage.cfg.train.grad_clip, rt.pp_group)
        finite = math.isfinite(float(grad_norm))
        if finite:
            rt.optimizer.step()
        else:
            rt.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += rt.stage.tokens_per_step
        self.flops += rt.stage.flops_per_step
        return StepOutcome(loss, grad_norm, lr, finite)

    def after_bad_step(self, grad_norm: float) -> bool:
        """Report a dropped update and apply train.nonfinite; True when the run rolled back."""
        self.metrics.info(f"step {self.step}: non-finite loss or gradients (gradient norm {grad_norm}): update "
                          f"dropped ({self.guard.in_a_row + 1} in a row)")
        if self.guard.bad_step(self.step, grad_norm, self.last_checkpoint()) == "rollback":
            self.roll_back()
            return True
        return False

    def log_start(self) -> None:
        rt, stage = self.current, self.current.stage
        self.metrics.info(
            f"ppmoe: {stage.shape.n_layers} layers, d_model {stage.shape.d_model}, "
            f"{count_parameters(stage.shape):,} params | world {self.rt.world_size} = tp {rt.dims.tp} x "
            f"pp {rt.dims.pp} x dp {rt.dims.dp} ({stage.cfg.parallel.dp_type}) | {stage.tokens_per_step:,} "
            f"tokens/step | device {self.rt.device}")
        for line in memory_report(self.plan, self.rt.world_size, self.rt.device.type, device_memory(self.rt.device)):
            self.metrics.info(line)
        if len(self.plan.stages) > 1:
            self.metrics.info(f"plan: {self.plan.total_steps} steps in {len(self.plan.stages)} stages\n"
                              + describe(self.plan))
        for warning in check_growth(self.cfg):
            self.metrics.info(f"note: {warning}")

    def fit(self) -> TrainResult:
        cfg = self.cfg
        total = self.plan.total_steps
        result = TrainResult()
        self.maybe_resume()
        self.log_start()
        stop = StopRequest(announce=self.say)
        run_start, window_tokens, window_time, window_steps = time.perf_counter(), 0, 0.0, 0
        window_flops = 0.0
        try:
            while self.step < total:
                stage = self.current.stage
                step_start = time.perf_counter()
                loss, grad_norm, lr, finite = self.train_step()
                if self.rt.device.type == "cuda":
                    torch.cuda.synchronize()
                self.lock.refresh()
                if finite:
                    self.guard.good_step()
                elif self.after_bad_step(float(grad_norm)):
                    window_tokens, window_time, window_steps, window_flops = 0, 0.0, 0, 0.0
                    continue
                window_time += time.perf_counter() - step_start
                window_tokens += stage.tokens_per_step
                window_flops += stage.flops_per_step
                window_steps += 1
                last = self.step == total
                boundary = self.step == stage.end and not last
                record = {}
                if self.step % cfg.train.log_every == 0 or last or boundary:
                    tokens_per_sec = window_tokens / max(window_time, 1e-9)
                    record = {"step": self.step, "stage": stage.name, "phase": stage.phase,
                              "loss": self.global_mean(loss), "lr": lr,
                              "grad_norm": float(grad_norm), "tokens_per_sec": tokens_per_sec,
                              "tokens_seen": self.tokens_seen, "flops": self.flops,
                              "mfu": (window_flops / max(window_time, 1e-9) / (self.peak_flops * self.rt.world_size)
                                      if self.peak_flops else None),
                              "memory_gib": peak_memory_gib(self.rt.device),
                              "elapsed_s": time.perf_counter() - run_start}
                    record.update(self.current.moe.collect(window_steps, self.rt.device))
                    spiked_above = self.spikes.observe(record["loss"])
                    if spiked_above is not None:
                        record["loss_spike"] = True
                        self.metrics.info(f"step {self.step}: loss spike: {record['loss']:.4f} against a moving "
                                          f"average of {spiked_above:.4f} (train.loss_spike_factor="
                                          f"{self.cfg.train.loss_spike_factor:g})")
                    result.losses[self.step] = record["loss"]
                    result.tokens_per_sec = tokens_per_sec
                    window_tokens, window_time, window_steps, window_flops = 0, 0.0, 0, 0.0
                if cfg.train.val_every and (self.step % cfg.train.val_every == 0 or last):
                    record.setdefault("step", self.step)
                    key = "val_loss" if stage.phase == "token" else "val_patch_loss"
                    record[key] = self.validation_loss()
                    if key == "val_loss":
                        result.val_losses[self.step] = record[key]
                if record:
                    self.metrics.log(record)
                stopping = stop.agreed(self.rt.device)
                probe = self.probe_loss(stage, self.probe_rows(stage, self.plan.stages[stage.index + 1])) \
                    if boundary else 0.0
                # A stage boundary is a checkpoint: the next stage is built from it (and a resumed run too).
                # No periodic save inside a run of non-finite steps: nothing changed since the last good step, and
                # rotation would push out older checkpoints for one that may hold the state that broke.
                periodic = cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and not self.guard.in_a_row
                if stopping or boundary or periodic or (last and cfg.checkpoint.save_final):
                    result.checkpoint = self.save(probe)
                if stopping:
                    self.metrics.info(f"stop requested: saved at step {self.step}, exiting")
                    result.stopped_by_signal = True
                    break
                if boundary:
                    self.enter_from_checkpoint(result.checkpoint)
        finally:
            stop.restore()
            self.metrics.close()
            self.lock.release()
        result.last_step = self.step
        return result
