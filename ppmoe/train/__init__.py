"""The training loop and what it needs: optimizer and schedule, loss, checkpoints, metrics, signals."""

from .memory_estimate import config_report
from .trainer import Trainer, TrainResult

__all__ = ["Trainer", "TrainResult", "config_report"]
