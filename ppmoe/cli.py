"""Command line: `python -m ppmoe {train,prepare,config} ...` (also installed as `ppmoe`)."""

from __future__ import annotations

import argparse
import sys

from .config import ConfigError, load_config


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ppmoe", description="Pretrain (MoE) language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in [("train", "train a model (alone, or under torchrun/srun)"),
                            ("prepare", "tokenize the config's data source into memory-mapped shards")]:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("config", help="YAML experiment config (see configs/)")
        p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides",
                       help="override config keys, e.g. --set train.lr=3e-4 parallel.tp=2")
        if name == "prepare":
            p.add_argument("--overwrite", action="store_true", help="rebuild an existing prepared dataset")
    sub.add_parser("config", help="print the config reference (every key, its default and meaning)")
    slurm = sub.add_parser("slurm", help="write an sbatch script (srun + torchrun, requeue on preemption)")
    slurm.add_argument("config")
    slurm.add_argument("--nodes", type=int, default=1)
    slurm.add_argument("--gpus-per-node", type=int, default=8)
    slurm.add_argument("--time", default="24:00:00", help="SLURM time limit")
    slurm.add_argument("--job-name", default="ppmoe")
    slurm.add_argument("--partition")
    slurm.add_argument("--account")
    slurm.add_argument("--grace-s", type=int, default=300, help="seconds before the limit to checkpoint and requeue")
    slurm.add_argument("--cpus-per-task", type=int, default=64)
    slurm.add_argument("--port", type=int, default=29500, help="c10d rendezvous port on the first node")
    slurm.add_argument("--python", default="python", help="interpreter on the compute nodes")
    slurm.add_argument("--workdir", default=".", help="directory the job runs in (the repository)")
    slurm.add_argument("--log-dir", default="logs")
    slurm.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides")
    slurm.add_argument("--out", help="write the script here instead of standard output")
    return parser.parse_args(argv)


def write_slurm_script(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .launch.slurm import SlurmJob, render

    fields = {k: v for k, v in vars(args).items() if k not in ("command", "out")}
    script = render(SlurmJob(**fields))
    if args.out:
        Path(args.out).write_text(script)
        print(f"wrote {args.out}: sbatch {args.out}")
    else:
        print(script, end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "config":
            from .config.docs import reference_markdown
            print(reference_markdown())
            return 0
        cfg = load_config(args.config, args.overrides)
        if args.command == "slurm":
            return write_slurm_script(args)
        if args.command == "prepare":
            from .data import prepare_dataset
            prepare_dataset(cfg.data, overwrite=args.overwrite)
            return 0
        from .parallel import shutdown
        from .train import Trainer
        try:
            Trainer(cfg).fit()
        finally:
            shutdown()
        return 0
    except ConfigError as e:
        print(f"ppmoe: config error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"ppmoe: {e}", file=sys.stderr)
        return 2
