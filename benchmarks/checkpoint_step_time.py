"""Step time before and after a checkpoint save, in one process: does saving slow training down?

    OMP_NUM_THREADS=2 python benchmarks/checkpoint_step_time.py [--config configs/tiny_cpu.yaml] \
        [--steps 6] [--saver dcp|torch|none] [--out runs/bench/checkpoint_step_time.json]

Builds the trainer for --config (single process; the dataset must be prepared), times --steps training
steps (after 2 warm-up steps), saves the model and optimizer state with --saver, and times --steps more.
`none` is the control: the same steps with no save between them.

Found with it (2-core CPU, tiny_cpu, OMP_NUM_THREADS=2): after torch.distributed.checkpoint.save every
later step is ~1.5x slower (0.15 -> 0.24 s), element-wise ops (mul, fill_, log_softmax and its backward)
2-4x, matmuls barely; torch.save of the same state dict and a thread doing OpenMP work do not do this, and
it goes away with OMP_NUM_THREADS=1. No thread spins, torch's flags and thread counts are unchanged,
and cloning parameters and optimizer state does not help. `--saver dcp_nodist` (dcp.save(...,
no_dist=True), no cross-rank planning) shows no slowdown, so it comes from the distributed save path;
the exact cause is not found yet. ppmoe's CheckpointManager saves with no_dist at world size 1, which
covers single-process CPU runs; multi-process CPU runs may still see it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.distributed.checkpoint.state_dict import get_state_dict  # noqa: E402

from ppmoe.config import load_config  # noqa: E402
from ppmoe.train import Trainer  # noqa: E402


def time_steps(trainer: Trainer, steps: int) -> float:
    for _ in range(2):
        trainer.train_step()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny_cpu.yaml")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--saver", choices=["dcp", "dcp_nosync", "dcp_nodist", "torch", "none"], default="dcp")
    parser.add_argument("--out", default="runs/bench/checkpoint_step_time.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(REPO / args.config, [f"output_dir={tmp}/run", "train.resume=none", "train.val_every=0",
                                               "checkpoint.save_final=false", "train.steps=1000"])
        trainer = Trainer(cfg)
        before = time_steps(trainer, args.steps)
        model_sd, optim_sd = get_state_dict(trainer.model, trainer.optimizer)
        if args.saver == "dcp":
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=f"{tmp}/ckpt")
        elif args.saver == "dcp_nosync":
            writer = dcp.FileSystemWriter(f"{tmp}/ckpt", sync_files=False, thread_count=1)
            dcp.save({"model": model_sd, "optim": optim_sd}, storage_writer=writer)
        elif args.saver == "dcp_nodist":
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=f"{tmp}/ckpt", no_dist=True)
        elif args.saver == "torch":
            torch.save({"model": model_sd, "optim": optim_sd}, f"{tmp}/ckpt.pt")
        after = time_steps(trainer, args.steps)
    result = {"config": args.config, "saver": args.saver, "threads": torch.get_num_threads(),
              "step_s_before": before, "step_s_after": after, "ratio": after / before}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"saver {args.saver:5s} threads {result['threads']}: step {before:.3f} s before, {after:.3f} s after "
          f"({result['ratio']:.2f}x)")


if __name__ == "__main__":
    main()
