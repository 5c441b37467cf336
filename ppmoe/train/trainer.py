"""The training loop: build (mesh, model, parallelism, optimizer, data), resume, step, log, checkpoint."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from patchtrain import Phase, build_plan
from patchtrain.loader import PhaseAlignedLoader
from patchtrain.phase_io import PhaseIO, phase_io

from ..config import ExperimentConfig, save_config, validate
from ..data import BatchLoader, iter_eval_batches, read_meta
from ..model import build_model, model_shape, peak_flops_per_device, training_flops_per_token
from ..parallel import (ParallelDims, Runtime, clip_grad_norm,
                        init_distributed)
from .checkpoint import CheckpointManager
from .loss import build_loss
from .metrics import MetricsLogger, peak_memory_gib
from .moe_metrics import MoEMonitor, set_aux_loss_scale
from .optim import build_optimizer, materialize_state, set_lr
from .signals import StopRequest
from .parallelize import parallelize
from .step import autocast_factory


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
        dp = validate(cfg, self.rt.world_size)
        self.cfg = cfg
        self.dims = ParallelDims(tp=cfg.parallel.tp, pp=cfg.parallel.pp, dp=dp, world_size=self.rt.world_size)
        self.mesh = self.dims.build_mesh(self.rt.device.type)
        self.dp_mesh, self.tp_mesh = self.mesh["dp"], self.mesh["tp"]
        self.run_dir = Path(cfg.output_dir)
        if self.rt.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")

        meta = read_meta(cfg.data.dataset_dir)
        self.shape = model_shape(cfg, meta["vocab_size"], self.rt.device.type)
        self.autocast = autocast_factory(self.rt.device, cfg.train.dtype)
        self.plan = build_plan(cfg)
        # `model`: this rank's parameters (all layers, or its pipeline stages) under the full model's names.
        # The runner's loss is the first phase's, set in enter_phase.
        self.model, self.runner = parallelize(build_model(self.shape, cfg.train.seed, self.rt.device), cfg,
                                              self.dims, self.mesh, self.rt.device, build_loss(self.dims.tp),
                                              self.autocast)
        self.optimizer = build_optimizer(self.model, cfg.train, self.rt.device)
        self.pp_group = self.mesh["pp"].get_group() if self.dims.pp > 1 else None

        t = cfg.train
        self.local_batch = t.global_batch_size // dp
        set_aux_loss_scale(self.model, t.micro_batch_size / self.local_batch)
        moe_ids = [i for i in range(self.shape.n_layers) if self.shape.is_moe_layer(i)]
        self.moe = MoEMonitor(self.model.layers, moe_ids, self.shape.moe.num_experts if self.shape.moe else 0,
                              self.pp_group, self.dp_mesh.get_group(), cfg.moe.imbalance_warn_ratio,
                              cfg.moe.imbalance_warn_steps, lambda msg: self.metrics.info(msg))
        # Both phases compute seq_len positions per sequence, so a step costs the same FLOPs in each.
        self.flops_per_step = training_flops_per_token(self.shape, t.seq_len) * t.global_batch_size * t.seq_len
        self.peak_flops = peak_flops_per_device(t.peak_flops)
        self.ckpt = CheckpointManager(cfg.checkpoint.dir or self.run_dir / "checkpoints", cfg.checkpoint.keep,
                                      self.rt.rank)
        self.metrics = MetricsLogger(cfg, self.run_dir, self.rt.is_main)
        self.step = 0
        self.tokens_seen = 0
        self.flops = 0.0
        self.io: PhaseIO | None = None
        patch_size = self.plan.phases[0].patch_size
        self.aligned_loader = PhaseAlignedLoader(
            cfg.data.dataset_dir, "train", t.seq_len, patch_size, t.global_batch_size, self.dp_mesh.get_local_rank(),
            dp, t.seed) if patch_size > 1 else None
        self.enter_phase(self.plan.phases[0])

    # ---- phases (patch-level training) ----------------------------------------------------------
    def enter_phase(self, phase: Phase, samples_seen: int = 0) -> None:
        """Wire input, loss and data for `phase` (patchtrain.phase_io). With K > 1 both phases share one
        chunked data order (patchtrain.loader); otherwise (token-only runs, K = 1) the ordinary loader
        continues `samples_seen` samples in."""
        t = self.cfg.train
        self.phase = phase
        if self.io is not None:
            self.io.close()
        self.io = phase_io(phase, self.runner.parts, self.dims.tp, self.rt.device, t.seq_len)
        self.runner.set_loss(self.io.loss_fn)
        if self.aligned_loader is not None:  # one data order: the token phase reads what the patch phase did not
            self.loader = self.aligned_loader
            self.loader.set_phase(phase.name)
        else:
            self.loader = BatchLoader(self.cfg.data.dataset_dir, "train", self.io.window, t.global_batch_size,
                                      self.dp_mesh.get_local_rank(), self.dims.dp, t.seed)
            self.loader.advance(samples_seen)
        self.tokens_per_step = t.global_batch_size * self.io.tokens_per_sequence

    def switch_phase(self) -> None:
        """Patch phase done: token level from here, with a fresh optimizer unless configured otherwise."""
        previous = self.phase
        self.enter_phase(self.plan.phase_for_step(self.step + 1), samples_seen=self.loader.samples_seen)
        if self.cfg.patch.reset_optimizer:
            self.optimizer = self.fresh_optimizer()
        self.metrics.info(f"step {self.step}: {previous.name} phase done ({self.tokens_seen:,} tokens); "
                          f"{self.phase.name} level from here"
                          + (", fresh optimizer" if self.cfg.patch.reset_optimizer else ""))

    def fresh_optimizer(self) -> torch.optim.Optimizer:
        optimizer = build_optimizer(self.model, self.cfg.train, self.rt.device)
        materialize_state(optimizer)  # the switch checkpoint is taken before its first step
        return optimizer

    # ---- state -------------------------------------------------------------------------------
    def trainer_state(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "flops": self.flops,
                "data": self.loader.state_dict()}

    def save(self) -> Path:
        path = self.ckpt.save(self.step, self.model, self.optimizer, self.trainer_state())
        self.metrics.info(f"saved checkpoint {path}")
        return path

    def maybe_resume(self) -> None:
        resume = self.cfg.train.resume
        if resume == "none":
            return
        path = self.ckpt.latest() if resume == "auto" else Path(resume)
        if path is None:
            return
        # The saved step decides the phase, which decides the data windows and the optimizer to load into.
        saved_step = int(self.ckpt.read_trainer_state(path, self.trainer_state())["step"])
        phase = self.plan.phase_for_step(saved_step + 1)
        if phase != self.phase:
            self.enter_phase(phase)
            if self.cfg.patch.reset_optimizer:
                self.optimizer = self.fresh_optimizer()
        state = self.ckpt.load(path, self.model, self.optimizer, self.trainer_state())
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.flops = float(state["flops"])
        self.loader.load_state_dict(state["data"])
        self.metrics.info(f"resumed from {path} at step {self.step}")

    # ---- loop --------------------------------------------------------------------------------
    def validation_loss(self) -> float:
        """Validation loss of the current phase's objective (next-patch loss in the patch phase)."""
        t = self.cfg.train
        batches = iter_eval_batches(self.cfg.data.dataset_dir, "val", self.io.window, t.global_batch_size,
                                    t.val_batches, self.dp_mesh.get_local_rank(), self.dims.dp)
        for part in self.runner.parts:
            part.eval()
        losses = [self.runner.eval_step(*(b.to(self.rt.device) for b in self.io.to_batch(x, y))) for x, y in batches]
        for part in self.runner.parts:
            part.train()
        return self.global_mean(torch.stack(losses).mean())

    def global_mean(self, value: torch.Tensor) -> float:
        """The loss of the whole global batch from per-rank values: summed over the pipeline group (only
        the last stage holds it), averaged over the data-parallel group (TP ranks already agree)."""
        value = value.clone()
        if self.pp_group is not None:
            dist.all_reduce(value, group=self.pp_group)
        if self.dims.dp > 1:
            dist.all_reduce(value, group=self.dp_mesh.get_group())
            value /= self.dims.dp
        return float(value)

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """One optimizer step; returns (this rank's loss, global grad norm, lr)."""
        t = self.cfg.train
        inputs, targets = self.io.to_batch(*self.loader.next_batch())
        lr = self.plan.lr(self.step + 1, t)
        set_lr(self.optimizer, lr)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.runner.train_step(inputs.to(self.rt.device), targets.to(self.rt.device))
        grad_norm = clip_grad_norm(self.model.parameters(), t.grad_clip, self.pp_group)
        self.optimizer.step()
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        self.flops += self.flops_per_step
        return loss, grad_norm, lr

    def fit(self) -> TrainResult:
        cfg, t = self.cfg, self.cfg.train
        result = TrainResult()
        self.maybe_resume()
        self.metrics.info(
            f"ppmoe: {self.shape.n_layers} layers, d_model {self.shape.d_model}, "
            f"{sum(p.numel() for p in self.model.parameters()):,} params | world {self.rt.world_size} "
            f"= tp {self.dims.tp} x pp {self.dims.pp} x dp {self.dims.dp} ({cfg.parallel.dp_type}) | "
            f"{self.tokens_per_step:,} tokens/step | device {self.rt.device}"
        )
        stop = StopRequest()
        run_start, window_tokens, window_time, window_steps = time.perf_counter(), 0, 0.0, 0
        window_flops = 0.0
        try:
            while self.step < t.steps:
                step_start = time.perf_counter()
                loss, grad_norm, lr = self.train_step()
                if self.rt.device.type == "cuda":
                    torch.cuda.synchronize()
                window_time += time.perf_counter() - step_start
                window_tokens += self.tokens_per_step
                window_flops += self.flops_per_step
                window_steps += 1
                last = self.step == t.steps
                record = {}
                if self.step % t.log_every == 0 or last:
                    tokens_per_sec = window_tokens / max(window_time, 1e-9)
                    record = {"step": self.step, "phase": self.phase.name, "loss": self.global_mean(loss), "lr": lr,
                              "grad_norm": float(grad_norm), "tokens_per_sec": tokens_per_sec,
                              "tokens_seen": self.tokens_seen, "flops": self.flops,
                              "mfu": (window_flops / max(window_time, 1e-9) / (self.peak_flops * self.rt.world_size)
                                      if self.peak_flops else None),
                              "memory_gib": peak_memory_gib(self.rt.device),
                              "elapsed_s": time.perf_counter() - run_start}
                    record.update(self.moe.collect(window_steps, self.rt.device))
                    result.losses[self.step] = record["loss"]
                    result.tokens_per_sec = tokens_per_sec
                    window_tokens, window_time, window_steps, window_flops = 0, 0.0, 0, 0.0
                if t.val_every and (self.step % t.val_every == 0 or last):
                    record.setdefault("step", self.step)
                    key = "val_loss" if self.phase.name == "token" else "val_patch_loss"
                    record[key] = self.validation_loss()
                    if key == "val_loss":
                        result.val_losses[self.step] = record[key]
                    self.moe.reset()  # validation's routing is not training load
                if record:
                    self.metrics.log(record)
                switching = self.step == self.phase.end and not last
                if switching:
                    self.switch_phase()
                stopping = stop.agreed(self.rt.device)
                # The switch is a checkpoint boundary: a resumed run starts the token phase from here.
                if stopping or switching or (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0) or (
                        last and cfg.checkpoint.save_final):
                    result.checkpoint = self.save()
                if stopping:
                    self.metrics.info(f"stop requested: saved at step {self.step}, exiting")
                    result.stopped_by_signal = True
                    break
        finally:
            stop.restore()
            self.metrics.close()
        result.last_step = self.step
        return result
