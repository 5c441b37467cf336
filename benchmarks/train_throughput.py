"""Training throughput of one config at several layouts, measured side by side in one run.

    python benchmarks/train_throughput.py [--config configs/tiny_cpu.yaml] [--steps 40] \
        [--layouts 1:tp1 2:dp2 2:tp2] [--out runs/bench/train_throughput.json]

Each layout is a real `torchrun` launch of `ppmoe train` on the prepared dataset; tokens/s is read from
metrics.jsonl over the second half of the steps (the first half warms up). Writes JSON and prints a table.
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

from ppmoe.train.metrics import read_metrics  # noqa: E402

LAYOUT_OVERRIDES = {"tp1": [], "dp2": ["parallel.tp=1"], "tp2": ["parallel.tp=2"],
                    "dp2_ddp": ["parallel.tp=1", "parallel.dp_type=ddp"], "tp2dp2": ["parallel.tp=2"]}


def run_layout(config: str, nproc: int, layout: str, steps: int, workdir: Path) -> dict:
    out = workdir / f"{layout}_{nproc}"
    threads = max(1, (os.cpu_count() or 1) // nproc)
    overrides = [f"output_dir={out}", f"train.steps={steps}", f"train.log_every={steps // 2}",
                 "train.val_every=0", "checkpoint.save_final=false", "train.resume=none",
                 *LAYOUT_OVERRIDES[layout]]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "ppmoe", "train", config, "--set", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if proc.returncode != 0:
        raise RuntimeError(f"{layout} on {nproc} processes failed:\n{proc.stdout}\n{proc.stderr}")
    last = read_metrics(out / "metrics.jsonl")[steps]
    return {"layout": layout, "processes": nproc, "threads_per_process": threads,
            "tokens_per_sec": last["tokens_per_sec"], "loss_at_end": last["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny_cpu.yaml")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--layouts", nargs="+", default=["1:tp1", "2:dp2", "2:tp2"],
                        help="NPROC:LAYOUT with LAYOUT in " + ", ".join(LAYOUT_OVERRIDES))
    parser.add_argument("--out", default="runs/bench/train_throughput.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run_layout(args.config, int(n), layout, args.steps, Path(tmp))
                for n, layout in (item.split(":") for item in args.layouts)]
    base = rows[0]["tokens_per_sec"]
    for row in rows:
        row["ratio_to_first"] = row["tokens_per_sec"] / base
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"config": args.config, "steps": args.steps, "rows": rows}, indent=2))
    print(f"{'layout':<10} {'procs':>5} {'threads':>7} {'tokens/s':>10} {'ratio':>6}")
    for r in rows:
        print(f"{r['layout']:<10} {r['processes']:>5} {r['threads_per_process']:>7} "
              f"{r['tokens_per_sec']:>10,.0f} {r['ratio_to_first']:>6.2f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
