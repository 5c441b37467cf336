"""Training throughput of one config at several layouts (TP, DP, pipeline schedules), side by side.

    python benchmarks/train_throughput.py [--config configs/tiny_cpu.yaml] [--steps 40] \
        [--layouts 1:tp1 2:dp2 2:tp2] [--set key=value ...] [--out runs/bench/train_throughput.json]
    python benchmarks/train_throughput.py --pipeline      # the pipeline report: pp1 vs 1F1B/GPipe/interleaved

Each layout is a real `torchrun` launch of `ppmoe train` on the prepared dataset with the same model and
global batch; tokens/s is read from metrics.jsonl over the second half of the steps (the first half warms
up). For pipeline layouts the table also gives the schedule's ideal bubble fraction, (p - 1) / (v m + p - 1)
for p stages per pipeline, v virtual stages per rank and m micro-batches (Narayanan et al., 2021), and the
measured tokens/s per process relative to the first layout. Writes JSON and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402

from ppmoe.train.metrics import read_metrics  # noqa: E402

LAYOUT_OVERRIDES = {
    "tp1": [], "dp2": ["parallel.tp=1"], "tp2": ["parallel.tp=2"],
    "dp2_ddp": ["parallel.tp=1", "parallel.dp_type=ddp"], "tp2dp2": ["parallel.tp=2"],
    "pp2_1f1b": ["parallel.tp=1", "parallel.pp=2"],
    "pp2_gpipe": ["parallel.tp=1", "parallel.pp=2", "parallel.pp_schedule=gpipe"],
    "pp2_interleaved": ["parallel.tp=1", "parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b",
                        "parallel.pp_virtual_stages=2"],
    "pp4_1f1b": ["parallel.tp=1", "parallel.pp=4"],
    "pp2_interleaved_zb": ["parallel.tp=1", "parallel.pp=2", "parallel.pp_schedule=interleaved_zb",
                           "parallel.pp_virtual_stages=2"],
    "pp2_zbv": ["parallel.tp=1", "parallel.pp=2", "parallel.pp_schedule=zbv", "parallel.pp_virtual_stages=2"],
    "pp2_dualpipev": ["parallel.tp=1", "parallel.pp=2", "parallel.pp_schedule=dualpipev",
                      "parallel.pp_virtual_stages=2"],
    "tp2_sp": ["parallel.tp=2", "parallel.sequence_parallel=true"],
}
ZERO_BUBBLE = ("interleaved_zb", "zbv", "dualpipev")
PIPELINE_REPORT = {"layouts": ["1:tp1", "2:pp2_gpipe", "2:pp2_1f1b", "2:pp2_interleaved", "2:pp2_interleaved_zb",
                               "2:pp2_zbv", "2:pp2_dualpipev", "4:pp4_1f1b"],
                   # untied embeddings (the head lives on the last stage) and 8 micro-batches per step
                   "set": ["model.tie_embeddings=false", "train.micro_batch_size=2"]}


def ideal_bubble(overrides: list[str], global_batch: int, micro: int) -> float:
    """(p - 1) / (v m + p - 1) of the layout's schedule; 0 without pipelining, and 0 for the zero-bubble
    schedules (their ideal, when forward, input-gradient and weight-gradient passes take equal time)."""
    get = dict(o.split("=", 1) for o in overrides)
    if get.get("parallel.pp_schedule") in ZERO_BUBBLE:
        return 0.0
    p, v = int(get.get("parallel.pp", 1)), int(get.get("parallel.pp_virtual_stages", 1))
    m = global_batch // micro
    return (p - 1) / (v * m + p - 1)


def run_layout(config: str, nproc: int, layout: str, steps: int, workdir: Path, common: list[str]) -> dict:
    out = workdir / f"{layout}_{nproc}"
    threads = max(1, (os.cpu_count() or 1) // nproc)
    overrides = [f"output_dir={out}", f"train.steps={steps}", f"train.log_every={steps // 2}",
                 "train.warmup_steps=1", "train.val_every=0", "checkpoint.save_final=false", "train.resume=none",
                 *common, *LAYOUT_OVERRIDES[layout]]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "ppmoe", "train", config, "--set", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if proc.returncode != 0:
        raise RuntimeError(f"{layout} on {nproc} processes failed:\n{proc.stdout}\n{proc.stderr}")
    last = read_metrics(out / "metrics.jsonl")[steps]
    saved = yaml.safe_load((out / "config.yaml").read_text())["train"]
    return {"layout": layout, "processes": nproc, "threads_per_process": threads,
            "tokens_per_sec": last["tokens_per_sec"], "loss_at_end": last["loss"],
            "ideal_bubble": ideal_bubble(LAYOUT_OVERRIDES[layout], saved["global_batch_size"],
                                         saved["micro_batch_size"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny_cpu.yaml")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--layouts", nargs="+", default=["1:tp1", "2:dp2", "2:tp2"],
                        help="NPROC:LAYOUT with LAYOUT in " + ", ".join(LAYOUT_OVERRIDES))
    parser.add_argument("--set", nargs="+", default=[], dest="common", help="overrides for every layout")
    parser.add_argument("--pipeline", action="store_true", help="the pipeline schedule report (layouts and "
                        "overrides preset; --layouts/--set add to them)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    layouts, common = args.layouts, args.common
    if args.pipeline:
        layouts = PIPELINE_REPORT["layouts"]
        common = [*PIPELINE_REPORT["set"], *args.common]
    out = args.out or f"runs/bench/{'pipeline' if args.pipeline else 'train'}_throughput.json"
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run_layout(args.config, int(n), layout, args.steps, Path(tmp), common)
                for n, layout in (item.split(":") for item in layouts)]
    base = rows[0]["tokens_per_sec"]
    for row in rows:
        row["ratio_to_first"] = row["tokens_per_sec"] / base
        row["per_process_ratio"] = row["ratio_to_first"] * rows[0]["processes"] / row["processes"]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"config": args.config, "steps": args.steps, "overrides": common,
                                     "rows": rows}, indent=2))
    print(f"{'layout':<20} {'procs':>5} {'threads':>7} {'tokens/s':>10} {'ratio':>6} {'per proc':>8} {'bubble':>7}")
    for r in rows:
        print(f"{r['layout']:<20} {r['processes']:>5} {r['threads_per_process']:>7} {r['tokens_per_sec']:>10,.0f} "
              f"{r['ratio_to_first']:>6.2f} {r['per_process_ratio']:>8.2f} {r['ideal_bubble']:>7.1%}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
