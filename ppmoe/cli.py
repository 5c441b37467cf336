"""Command line: `python -m ppmoe {train,prepare,estimate,config,slurm,export,import,generate,plot} ...` (also
installed as `ppmoe`).

Errors a user can fix (a ConfigError, any ppmoe.errors.PpmoeError, bad input met while preparing a
dataset) are printed as one line, `ppmoe: ...`, on stderr, with the error's exit code and no
traceback. The modules that import torch (the trainer, the data pipeline, the process groups) are
imported inside the commands that need them, and only there: with them at the top, `ppmoe config`, `ppmoe
slurm` and a refused config took 3.3 s instead of 0.1 s (measured, 2-core CPU). Nothing imports this
module, so the deferred imports hide no cycle (tests/test_import_graph.py names them).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import ConfigError, load_config
from .config.docs import reference_markdown
from .errors import DataError, PpmoeError
from .launch.slurm import SlurmJob, render

INTERRUPTED_EXIT_CODE = 130  # the shell's 128 + SIGINT
CONFIG_ERROR_EXIT_CODE = 2


def add_overrides_argument(parser: argparse.ArgumentParser) -> None:
    """--set KEY=VALUE ...: repeatable; every occurrence adds to the list (applied in order), so
    `--set a=1 --set b=2` applies both (with plain nargs="+" the last --set silently replaced the rest)."""
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override config keys, applied in order, e.g. --set train.lr=3e-4 parallel.tp=2; "
                             "repeatable; a mapping merges into a section: --set 'model={n_layers: 2}'")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ppmoe", description="Pretrain (MoE) language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in [("train", "train a model (alone, or under torchrun/srun)"),
                            ("prepare", "tokenize the config's data source into memory-mapped shards")]:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("config", help="YAML experiment config (see configs/)")
        add_overrides_argument(p)
        if name == "prepare":
            p.add_argument("--overwrite", action="store_true", help="rebuild an existing prepared dataset")
    estimate = sub.add_parser("estimate", help="print the memory one GPU needs for a config (no GPU, no data needed)")
    estimate.add_argument("config")
    estimate.add_argument("--gpus", type=int, help="world size (default: tp * pp * parallel.dp when dp is set, "
                                                   "else one node of 8, or tp * pp when larger)")
    estimate.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU (default 80: H100)")
    add_overrides_argument(estimate)
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
    add_overrides_argument(slurm)
    slurm.add_argument("--out", help="write the script here instead of standard output")
    add_interop_parsers(sub)
    return parser.parse_args(argv)


def add_interop_parsers(sub) -> None:
    """The commands that take a trained model elsewhere: export, import, generate, plot."""
    export = sub.add_parser("export", help="write a checkpoint as a transformers model directory")
    export.add_argument("checkpoint", help="a run directory (its newest checkpoint) or a step_<N> directory")
    export.add_argument("--out", required=True, help="the new directory to write")
    export.add_argument("--format", choices=["hf"], default="hf", help="hf: transformers (safetensors)")
    export.add_argument("--arch", default="auto", help="auto (default), llama, mixtral or qwen2_moe")
    export.add_argument("--tokenizer", help="tokenizer.json to ship (default: the checkpoint's own)")
    export.add_argument("--config", help="the run's config, for checkpoints of an older ppmoe without model.json")
    export.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors file (GB)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    imp = sub.add_parser("import", help="write a transformers model as a ppmoe checkpoint (for train.init_from)")
    imp.add_argument("hf_dir", help="a transformers model directory (Llama, Mixtral or Qwen2-MoE, safetensors)")
    imp.add_argument("--config", required=True, help="YAML experiment config describing the same model")
    imp.add_argument("--out", required=True, help="the new checkpoint directory to write")
    add_overrides_argument(imp)
    gen = sub.add_parser("generate", help="sample text from a trained model (one process, CPU or GPU)")
    gen.add_argument("checkpoint", help="a run directory (its newest checkpoint) or a step_<N> directory")
    gen.add_argument("--prompt", required=True, help="the text to continue")
    gen.add_argument("--max-new-tokens", type=int, default=100)
    gen.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (0 = all)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    gen.add_argument("--config", help="the run's config, for checkpoints of an older ppmoe without model.json")
    plot = sub.add_parser("plot", help="draw loss, validation loss, tokens/s and expert load of runs")
    plot.add_argument("runs", nargs="+", help="run directories (each with metrics.jsonl)")
    plot.add_argument("--out", required=True, help="the PNG to write")
    plot.add_argument("--labels", nargs="+", help="one legend label per run (default: the directory names)")


def write_slurm_script(args: argparse.Namespace) -> int:
    fields = {k: v for k, v in vars(args).items() if k not in ("command", "out")}
    try:
        job = SlurmJob(**fields)
    except ValueError as e:  # a flag out of range; the message names it
        return report(str(e), CONFIG_ERROR_EXIT_CODE)
    script = render(job)
    if args.out:
        Path(args.out).write_text(script)
        print(f"wrote {args.out}: sbatch {args.out}")
    else:
        print(script, end="")
    return 0


def prepare(cfg, overwrite: bool) -> int:
    """`ppmoe prepare`. What the data pipeline raises about its input (no documents, a pattern that
    matches nothing, a file that is not UTF-8, a missing column or package, a directory it refuses to
    replace, a disk that fills up) becomes a DataError naming the dataset directory."""
    from .data import prepare_dataset  # deferred: imports torch (see the module docstring)

    try:
        prepare_dataset(cfg.data, overwrite=overwrite)
    except ConfigError:
        raise  # a ValueError too, but reported as a config error
    except (ValueError, KeyError, OSError, ImportError) as e:
        raise DataError(f"cannot prepare data.dataset_dir={cfg.data.dataset_dir}: {error_text(e)}") from e
    return 0


GPUS_PER_NODE = 8


def default_world_size(cfg) -> int:
    """`ppmoe estimate`'s world without --gpus: what the config pins (parallel.dp set), else one node of
    GPUS_PER_NODE, or the tp * pp a single model replica needs when that is larger."""
    model_parallel = cfg.parallel.tp * cfg.parallel.pp
    if cfg.parallel.dp is not None:
        return model_parallel * cfg.parallel.dp
    return max(GPUS_PER_NODE, model_parallel)


def estimate(cfg, args: argparse.Namespace) -> int:
    from .train import config_report  # deferred: imports torch (see the module docstring)

    world = args.gpus or default_world_size(cfg)
    for line in config_report(cfg, world, int(args.gpu_memory_gib * 2 ** 30)):
        print(line)
    return 0


def train(cfg) -> int:
    from .parallel import shutdown  # deferred: import torch (see the module docstring)
    from .train import Trainer

    try:
        Trainer(cfg).fit()
    except BaseException:
        shutdown()  # no barrier: the other ranks may never reach it
        raise
    shutdown(wait_for_all=True)
    return 0


def error_text(error: BaseException) -> str:
    """The message of `error` (a KeyError's str() is the repr of its argument, quotes included)."""
    if isinstance(error, KeyError) and error.args:
        return str(error.args[0])
    return str(error) or type(error).__name__


def report(message: str, exit_code: int) -> int:
    """Print `ppmoe: message` to stderr; return the exit code."""
    print(f"ppmoe: {message}", file=sys.stderr)
    return exit_code


def export(args: argparse.Namespace) -> int:
    from .interop.checkpoint_source import open_checkpoint  # deferred: imports torch (see the module docstring)
    from .interop.export import export_checkpoint

    source = open_checkpoint(args.checkpoint, args.config)
    report_ = export_checkpoint(source, Path(args.out), args.arch, Path(args.tokenizer) if args.tokenizer else None,
                                int(args.max_shard_gb * 1e9), overwrite=args.overwrite)
    print(f"exported {source.path} as {report_.architecture} ({report_.parameters:,} parameters) to {report_.out}: "
          f"load it with transformers.AutoModelForCausalLM.from_pretrained({str(report_.out)!r})")
    return 0


def import_(args: argparse.Namespace) -> int:
    from .interop.import_hf import import_model  # deferred: imports torch (see the module docstring)

    cfg = load_config(args.config, args.overrides)
    record = import_model(Path(args.hf_dir), cfg, Path(args.out))
    tokenizer = Path(args.out) / "tokenizer.json"
    print(f"imported {args.hf_dir} ({record.shape.n_layers} layers, d_model {record.shape.d_model}) to {args.out}: "
          f"start a run from it with --set train.init_from={args.out}"
          + (f" (and prepare data with data.tokenizer={tokenizer})" if tokenizer.is_file() else ""))
    return 0


def generate(args: argparse.Namespace) -> int:
    import torch  # deferred, with the modules below (see the module docstring)

    from .data import load_tokenizer
    from .inference import generate as sample
    from .inference.from_checkpoint import load_for_generation
    from .interop.checkpoint_source import open_checkpoint

    source = open_checkpoint(args.checkpoint, args.config)
    if source.tokenizer is None:
        raise PpmoeError(f"no tokenizer.json for {source.path}: pass --config with the run's config")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    tokenizer = load_tokenizer(source.tokenizer)
    prompt = tokenizer.encode(args.prompt).ids
    model = load_for_generation(source, device)
    try:
        new = sample(model, prompt, args.max_new_tokens, args.temperature, args.top_k or None,
                     source.record.eos_id, args.seed, vocab_size=source.record.vocab_size)
    except ValueError as e:  # a request longer than the model's positions: the message says what to lower
        return report(str(e), CONFIG_ERROR_EXIT_CODE)
    print(tokenizer.decode(prompt + new))
    return 0


def plot(args: argparse.Namespace) -> int:
    from .report import plot_runs  # deferred: imports matplotlib and torch (see the module docstring)

    out = plot_runs([Path(r) for r in args.runs], Path(args.out), args.labels)
    print(f"wrote {out}")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.command == "config":
        print(reference_markdown())
        return 0
    if args.command == "export":
        return export(args)
    if args.command == "import":
        return import_(args)
    if args.command == "generate":
        return generate(args)
    if args.command == "plot":
        return plot(args)
    cfg = load_config(args.config, args.overrides)
    if args.command == "slurm":
        return write_slurm_script(args)
    if args.command == "prepare":
        return prepare(cfg, args.overwrite)
    if args.command == "estimate":
        return estimate(cfg, args)
    return train(cfg)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except ConfigError as e:
        return report(f"config error: {e}", CONFIG_ERROR_EXIT_CODE)
    except PpmoeError as e:
        return report(str(e), e.exit_code)
    except FileNotFoundError as e:  # a missing dataset (read_meta): its message says to run prepare
        return report(str(e), CONFIG_ERROR_EXIT_CODE)
    except KeyboardInterrupt:  # a second Ctrl-C (the first asks the trainer to save and stop)
        return report("interrupted by a second Ctrl-C: not saved; train.resume=auto continues from the last "
                      "checkpoint", INTERRUPTED_EXIT_CODE)
