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
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "config":
            from .config.docs import reference_markdown
            print(reference_markdown())
            return 0
        cfg = load_config(args.config, args.overrides)
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
