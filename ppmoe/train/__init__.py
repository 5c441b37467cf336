"""The training loop and what it needs: optimizer and schedule, loss, checkpoints, metrics, signals."""

from .trainer import Trainer, TrainResult

__all__ = ["Trainer", "TrainResult"]
