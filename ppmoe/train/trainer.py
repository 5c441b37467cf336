"""The training loop: build (mesh, model, parallelism, optimizer, data), resume, step, log, checkpoint."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import ExperimentConfig, save_config, validate
from ..data import BatchLoader, iter_eval_batches, read_meta
from ..model import build_model, model_shape, peak_flops_per_device, training_flops_per_token
from ..parallel import (ParallelDims, Runtime, clip_grad_norm,
                        init_distributed)
from .checkpoint import CheckpointManager
from .loss import build_loss
from .metrics import MetricsLogger, peak_memory_gib
from .moe_metrics import MoEMonitor, set_aux_loss_scale
from .optim import build_optimizer, lr_at, set_lr
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
        self.shape = model_shape(cfg, meta["vocab_size"])
        self.loss_fn = build_loss(self.dims.tp)
        self.autocast = autocast_factory(self.rt.device, cfg.train.dtype)
        # `model`: this rank's parameters (all layers, or its pipeline stages) under the full model's names.
        self.model, self.runner = parallelize(build_model(self.shape, cfg.train.seed, self.rt.device), cfg,
                                              self.dims, self.mesh, self.rt.device, self.loss_fn, self.autocast)
        self.optimizer = build_optimizer(self.model, cfg.train, self.rt.device)
        self.pp_group = self.mesh["pp"].get_group() if self.dims.pp > 1 else None

        t = cfg.train
        self.local_batch = t.global_batch_size // dp
        set_aux_loss_scale(self.model, t.micro_batch_size / self.local_batch)
        moe_ids = [i for i in range(self.shape.n_layers) if self.shape.is_moe_layer(i)]
        self.moe = MoEMonitor(self.model.layers, moe_ids, self.shape.moe.num_experts if self.shape.moe else 0,
                              self.pp_group, self.dp_mesh.get_group(), cfg.moe.imbalance_warn_ratio,
                              cfg.moe.imbalance_warn_steps, lambda msg: self.metrics.info(msg))
        self.loader = BatchLoader(cfg.data.dataset_dir, "train", t.seq_len, t.global_batch_size,
                                  self.dp_mesh.get_local_rank(), dp, t.seed)
        self.tokens_per_step = t.global_batch_size * t.seq_len
        self.flops_per_token = training_flops_per_token(self.shape, t.seq_len)
        self.peak_flops = peak_flops_per_device(t.peak_flops)
        self.ckpt = CheckpointManager(cfg.checkpoint.dir or self.run_dir / "checkpoints", cfg.checkpoint.keep,
                                      self.rt.rank)
        self.metrics = MetricsLogger(cfg, self.run_dir, self.rt.is_main)
        self.step = 0
        self.tokens_seen = 0

    # ---- state -------------------------------------------------------------------------------
    def trainer_state(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "data": self.loader.state_dict()}

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
        state = self.ckpt.load(path, self.model, self.optimizer, self.trainer_state())
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.loader.load_state_dict(state["data"])
        self.metrics.info(f"resumed from {path} at step {self.step}")

    # ---- loop --------------------------------------------------------------------------------
    def validation_loss(self) -> float:
        t = self.cfg.train
        batches = iter_eval_batches(self.cfg.data.dataset_dir, "val", t.seq_len, t.global_batch_size,
                                    t.val_batches, self.dp_mesh.get_local_rank(), self.dims.dp)
        for part in self.runner.parts:
            part.eval()
        losses = [self.runner.eval_step(x.to(self.rt.device), y.to(self.rt.device)) for x, y in batches]
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
        inputs, targets = self.loader.next_batch()
        lr = lr_at(self.step + 1, t)
        set_lr(self.optimizer, lr)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.runner.train_step(inputs.to(self.rt.device), targets.to(self.rt.device))
        grad_norm = clip_grad_norm(self.model.parameters(), t.grad_clip, self.pp_group)
        self.optimizer.step()
        self.step += 1
        self.tokens_seen += self.tokens_per_step
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
        try:
            while self.step < t.steps:
                step_start = time.perf_counter()
                loss, grad_norm, lr = self.train_step()
                if self.rt.device.type == "cuda":
                    torch.cuda.synchronize()
                window_time += time.perf_counter() - step_start
                window_tokens += self.tokens_per_step
                window_steps += 1
                last = self.step == t.steps
                record = {}
                if self.step % t.log_every == 0 or last:
                    tokens_per_sec = window_tokens / max(window_time, 1e-9)
                    record = {"step": self.step, "loss": self.global_mean(loss), "lr": lr,
                              "grad_norm": float(grad_norm), "tokens_per_sec": tokens_per_sec,
                              "tokens_seen": self.tokens_seen,
                              "mfu": (tokens_per_sec * self.flops_per_token / (self.peak_flops * self.rt.world_size)
                                      if self.peak_flops else None),
                              "memory_gib": peak_memory_gib(self.rt.device),
                              "elapsed_s": time.perf_counter() - run_start}
                    record.update(self.moe.collect(window_steps, self.rt.device))
                    result.losses[self.step] = record["loss"]
                    result.tokens_per_sec = tokens_per_sec
                    window_tokens, window_time, window_steps = 0, 0.0, 0
                if t.val_every and (self.step % t.val_every == 0 or last):
                    record.setdefault("step", self.step)
                    record["val_loss"] = self.validation_loss()
                    result.val_losses[self.step] = record["val_loss"]
                    self.moe.reset()  # validation's routing is not training load
                if record:
                    self.metrics.log(record)
                stopping = stop.agreed(self.rt.device)
                if stopping or (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0) or (
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
