"""Where metrics go: the console progress line, metrics.jsonl in the run directory, wandb and TensorBoard."""

from __future__ import annotations

import json
import os
import resource
from pathlib import Path
from typing import Any

import torch

from ..config import ExperimentConfig, to_dict
from .tensorboard_sink import TensorBoardSink


def peak_memory_gib(device: torch.device) -> float:
    """Peak accelerator memory, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def format_line(m: dict[str, Any], total_steps: int, show_stage: bool = False) -> str:
    """One console line: step, (stage,) loss, lr, grad norm, tokens/s, MFU (if known), memory, val loss."""
    parts = [f"step {m['step']:>6}/{total_steps}", f"loss {m['loss']:.4f}", f"lr {m['lr']:.2e}",
             f"grad {m['grad_norm']:.3f}", f"tok/s {m['tokens_per_sec']:,.0f}"]
    if m.get("mfu") is not None:
        parts.append(f"mfu {100 * m['mfu']:.1f}%")
    if "aux_loss" in m:
        parts.append(f"aux {m['aux_loss']:.3f} z {m['z_loss']:.4f} drop {100 * m['dropped_frac']:.1f}%")
        parts.append("load max " + "/".join(f"{max(row) * len(row):.1f}x" for row in m["expert_load"]))
    parts.append(f"mem {m['memory_gib']:.2f}GiB")
    if "val_loss" in m:
        parts.append(f"val {m['val_loss']:.4f}")
    if "val_patch_loss" in m:
        parts.append(f"val(patch) {m['val_patch_loss']:.4f}")
    if m.get("phase") == "patch" and not (show_stage and m.get("stage") == "patch"):
        parts.insert(1, "patch")
    if show_stage and "stage" in m:
        parts.insert(1, m["stage"])
    return " | ".join(parts)


def format_boundary(m: dict[str, Any]) -> str:
    """A stage boundary: what grew, the probe loss just before and after, and what it cost."""
    line = (f"step {m['step']}: stage {m['from_stage']} -> {m['to_stage']}"
            f"{' (growth)' if m['event'] == 'growth' else ''} | params {m['params_before']:,} -> {m['params_after']:,} | "
            f"probe loss {m['probe_loss_before']:.4f} -> {m['probe_loss_after']:.4f} "
            f"({m['probe_loss_after'] - m['probe_loss_before']:+.4f})")
    if "exact" in m:
        line += f" | {'function-preserving' if m['exact'] else 'not function-preserving'}, " \
                f"transform {m['transform_s']:.2f} s"
    return line + f" | boundary {m['boundary_s']:.2f} s"


class WandbSink:
    """Logs each metrics record to wandb; offline unless an API key is present (auto mode)."""

    def __init__(self, cfg: ExperimentConfig, run_dir: Path):
        try:
            import wandb
        except ImportError as e:
            raise ImportError("logging.wandb is true but wandb is not installed: pip install 'ppmoe[wandb]'") from e
        mode = cfg.logging.wandb_mode
        if mode == "auto":
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        self.run = wandb.init(project=cfg.logging.wandb_project, name=cfg.logging.run_name or run_dir.name,
                              dir=str(run_dir), config=to_dict(cfg), mode=mode, resume="allow")

    def log(self, record: dict[str, Any]) -> None:
        self.run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        self.run.finish()


def build_sinks(cfg: ExperimentConfig, run_dir: Path) -> list:
    """The destinations beside metrics.jsonl and the console that rank 0 writes every record to: each has
    log(record) and close(), and each checks at once that its package is installed."""
    sinks = []
    if cfg.logging.wandb:
        sinks.append(WandbSink(cfg, run_dir))
    if cfg.logging.tensorboard:
        sinks.append(TensorBoardSink(run_dir))
    return sinks


class MetricsLogger:
    """Rank 0 writes; the other ranks' calls do nothing. metrics.jsonl is appended to, so a resumed
    run continues the same file (a step logged twice after a crash: the later record wins)."""

    def __init__(self, cfg: ExperimentConfig, run_dir: Path, is_main: bool, total_steps: int | None = None,
                 show_stage: bool = False):
        self.is_main = is_main
        self.total_steps = cfg.train.steps if total_steps is None else total_steps
        self.show_stage = show_stage
        self.path = run_dir / "metrics.jsonl"
        self.sinks = build_sinks(cfg, run_dir) if is_main else []

    def log(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for sink in self.sinks:
            sink.log(record)
        if "loss" in record:
            print(format_line(record, self.total_steps, self.show_stage), flush=True)
        elif "event" in record:
            print(format_boundary(record), flush=True)
        else:
            print(" | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()), flush=True)

    def info(self, message: str) -> None:
        if self.is_main:
            print(message, flush=True)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def read_metrics(path: str | Path) -> dict[int, dict]:
    """metrics.jsonl -> {step: merged record}, later records overriding earlier ones."""
    out: dict[int, dict] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            out.setdefault(record["step"], {}).update(record)
    return out
