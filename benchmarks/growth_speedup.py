"""Progressive growth (CompoundGrow, Gu et al. 2021) against the full-size model trained from scratch, at the
same training FLOPs: how much compute (and wall time) each growth recipe needs to reach the full model's
final validation loss.

    python benchmarks/growth_speedup.py [--config configs/tiny_growth_cpu.yaml] [--steps 600] \
        [--arms full,compound,depth,width,patch_compound,compound_identity] [--seeds 1234[,...]] \
        [--val-every 50] [--log-every 10] [--threads 2] [--out runs/bench/growth_speedup] [--retries 1] \
        [--verbose] [--keep-checkpoints] [--quick]
    python benchmarks/growth_speedup.py --quick     # smoke test: 40 steps, validation every 10,
                                                    # output runs/bench/growth_speedup_quick.*

Every arm is a real single-process run of `python -m ppmoe train CONFIG --set ...` (a subprocess with
OMP_NUM_THREADS=--threads; one run at a time, never two at once), in a fresh output directory
<out>_runs/<arm>_s<seed> (deleted and recreated; train.resume=none, checkpoint.every=0,
checkpoint.save_final=false: the only checkpoints are the ones the trainer writes at a stage boundary, deleted
after the run unless --keep-checkpoints).
All arms share the final model (the config's top-level model: 4 layers, d_model 128 in
configs/tiny_growth_cpu.yaml), the corpus, the seed, the peak and floor learning rate and the FLOPs budget:
train.steps=--steps is the budget in final-model steps and growth.split=flops turns each stage's share
into steps at that stage's cost, so every arm spends the training FLOPs of --steps full-size steps (up to
one step's rounding). The plan fits each run's warmup + cosine to its own steps, so every arm's learning
rate decays fully at the budget ("No Train No Gain", Kaddour et al. 2023: a baseline cut before its decay
finishes flatters the method).

  full               growth.stages=[]: the final model for --steps steps (the baseline)
  compound           the config as it is: [small: 2 layers, d_model 64, 2 heads, ffn 192, share 0.3] -> full
                     (depth, width and FFN grow at once; depth by stacking)
  depth              [2 layers at full width, share 0.3] -> full
  width              [4 layers, d_model 64, 2 heads, ffn 192, share 0.3] -> full
  patch_compound     compound with the small stage at patch level (patch_size 4, next-patch loss): the
                     growth happens at the switch to token level
  compound_identity  compound with growth.ops.depth=identity (the added layers start as identities, so the
                     whole growth preserves the function)
  ablations (not run unless named in --arms):
  small_only          the small model alone for the whole budget (train.steps scaled to equal FLOPs): is the
                      gain the growth, or just a smaller model being the better use of this budget?
  compound_global     compound with growth.schedule=global (one warmup + cosine over the run, 30-step
                      re-warmup after the growth) instead of the default per-stage schedules
  compound_transform  compound with growth.optimizer=transform (the Adam moments carried over)

Measured, per arm and seed (metrics.jsonl of the run, merged by ppmoe.train.metrics.read_metrics):
- final val loss: `val_loss` (train.val_batches batches of the held-out split) at the last step, i.e. at
  the budget C;
- the validation curve: (flops, val_loss, elapsed_s, tokens_seen, train_s) at every validation. `flops` is
  the trainer's cumulative training FLOPs (each stage at its own shape; validation not counted),
  `elapsed_s` the trainer's wall clock since the loop started (validation, logging and the growth
  boundaries included), `train_s` the optimizer steps' own time (rebuilt from each log record's tokens
  and tokens/s; validation and boundaries excluded). A patch-level stage logs `val_patch_loss`
  (next-patch loss, kept separately, not comparable): its token-level curve starts after the switch;
- total FLOPs, the process's wall time and the train loop's, steps per stage and each stage's mean
  tokens/s (its tokens over its step time);
- for growth arms the growth record: probe loss before/after (a fixed validation batch, the previous
  stage's objective) and the jump, `exact` (whether the operators claim to preserve the function),
  transform_s and boundary_s.
Against the `full` run of the same seed: the FLOPs at which the arm's validation loss first reaches the
full run's final val loss (linear interpolation in FLOPs between validation points; null if never reached)
and the speed-up C / C_reach; the same in wall time (interpolated elapsed_s; the speed-up is the full run's
elapsed_s at its last step over it) and in step time (train_s); the val loss gap at equal FLOPs (the arm's
final val minus the full run's). The full arm is measured the same way against itself (normally 1.0; more
than 1.0 when its curve dipped below its final value before the end). With several --seeds the table shows
mean ± sample standard deviation over the seeds (speed-ups over the seeds that reached the target).

Writes <out>.json (the command line, torch version, date, every run's plan, records and summary, the
per-arm aggregates), prints a markdown table, and draws <out>.png (validation loss against FLOPs and
against wall time, the full run's final loss as a horizontal line, growth boundaries marked on each
curve; needs matplotlib: without it the plot is skipped with a message).

What this is and is not evidence of: on a 2-core CPU with a ~1M-parameter model, a few hundred steps of
Shakespeare and one seed, this is a functional check of the growth machinery (every operator runs inside
a job, the FLOPs accounting of the split holds, the probe jump of function-preserving growth is ~0, the
curves are continuous across the boundary and end near the baseline). It is not evidence of a speed-up:
the gaps are of the order of seed noise, wall time at this size is dominated by fixed per-step overheads
rather than FLOPs (a model 1/4 the FLOPs is not 4x faster per step on a CPU), and the vocabulary head is
a large share of the small model's cost. The paper's savings (73.6% and 82.2% of the wall time for
BERT-base and BERT-large) were measured on full-size models and GPU/TPU budgets; reproducing a claim of
that kind needs the GPU configs, several seeds and budgets where the baseline is well converged.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from ppmoe.config import load_config  # noqa: E402
from ppmoe.data import read_meta  # noqa: E402
from ppmoe.train.metrics import read_metrics  # noqa: E402
from ppmoe.train.plan import build_stage_plan  # noqa: E402

SMALL = "{n_layers: 2, d_model: 64, n_heads: 2, ffn_hidden: 192}"
ARMS: dict[str, tuple[str, list[str]]] = {
    "full": ("no growth: the final model for train.steps steps", ["growth.stages=[]"]),
    "compound": ("small (2L, d64, 2 heads, ffn 192) -> full: depth, width and FFN at once (stack)",
                 ["growth.stages.0.share=0.3", f"growth.stages.0.model={SMALL}"]),
    "depth": ("2 layers at full width -> full (stack)",
              ["growth.stages.0.share=0.3", "growth.stages.0.model={n_layers: 2}"]),
    "width": ("4 layers at d64, 2 heads, ffn 192 -> full (clone, tile)",
              ["growth.stages.0.share=0.3",
               "growth.stages.0.model={n_layers: 4, d_model: 64, n_heads: 2, ffn_hidden: 192}"]),
    "patch_compound": ("small at patch size 4 -> full at token level (growth at the switch)",
                       ["growth.stages.0.share=0.3", f"growth.stages.0.model={SMALL}", "growth.stages.0.patch_size=4"]),
    "compound_identity": ("compound with growth.ops.depth=identity (function-preserving)",
                          ["growth.stages.0.share=0.3", f"growth.stages.0.model={SMALL}", "growth.ops.depth=identity"]),
    "compound_global": ("compound with growth.schedule=global (one cosine over the run, re-warmed 30 steps)",
                        ["growth.stages.0.share=0.3", f"growth.stages.0.model={SMALL}", "growth.schedule=global",
                         "growth.rewarm_steps=30"]),
    "compound_transform": ("compound with growth.optimizer=transform (Adam moments carried over)",
                           ["growth.stages.0.share=0.3", f"growth.stages.0.model={SMALL}", "growth.optimizer=transform"]),
    "small_only": ("the small model (2L, d64) for the whole budget, no growth",
                   ["growth.stages=[]", "model.n_layers=2", "model.d_model=64", "model.n_heads=2",
                    "model.ffn_hidden=192"]),
}
# Arms of one model that is not the final one: train.steps is scaled so that they spend the full arm's FLOPs.
OWN_MODEL_ARMS = ("small_only",)
DEFAULT_ARMS = ("full", "compound", "depth", "width", "patch_compound", "compound_identity")


def in_repo(path: str | Path) -> Path:
    """Relative paths in configs are relative to the repository (the runs' working directory)."""
    path = Path(path)
    return path if path.is_absolute() else REPO / path


def ensure_dataset(config: Path, dataset_dir: Path, env: dict) -> None:
    if (dataset_dir / "meta.json").is_file():
        return
    cmd = [sys.executable, "-m", "ppmoe", "prepare", str(config)]
    print(f"{dataset_dir / 'meta.json'} missing: {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, cwd=REPO, env=env, check=True)


def run_overrides(arm: str, out: Path, seed: int, steps: int, val_every: int, log_every: int) -> list[str]:
    return [f"output_dir={out}", "train.resume=none", "checkpoint.every=0", "checkpoint.save_final=false",
            f"train.steps={steps}", f"train.seed={seed}", f"train.val_every={val_every}",
            f"train.log_every={log_every}", *ARMS[arm][1]]


def describe_plan(plan) -> list[dict]:
    return [{"name": s.name, "start": s.start, "steps": s.steps, "end": s.end, "phase": s.phase,
             "patch_size": s.patch_size, "grows": s.grows, "reset_optimizer": s.reset_optimizer,
             "n_layers": s.shape.n_layers, "d_model": s.shape.d_model, "n_heads": s.shape.n_heads,
             "ffn_hidden": s.shape.ffn_hidden, "flops_per_step": s.flops_per_step,
             "tokens_per_step": s.tokens_per_step} for s in plan.stages]


def train_once(name: str, cmd: list[str], out: Path, total_steps: int, env: dict, verbose: bool, retries: int
               ) -> tuple[float, list[str], list[dict]]:
    """Run `cmd` in a fresh `out` until it reaches `total_steps` (a run a signal stopped early, which the
    trainer reports by saving and exiting 0, is run again from scratch); returns wall time, log lines and the
    stopped attempts."""
    stopped = []
    for attempt in range(retries + 1):
        if out.exists():
            shutil.rmtree(out)  # metrics.jsonl is appended to: a stale one would mix runs
        out.mkdir(parents=True)
        log_lines: list[str] = []
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            log_lines.append(line)
            if verbose:
                print(f"[{name}] {line.rstrip()}", flush=True)
        rc = proc.wait()
        wall = time.perf_counter() - start
        (out / "train.log").write_text("".join(log_lines))
        if rc != 0:
            last_line = next((line.strip() for line in reversed(log_lines) if line.strip()), "")
            raise RuntimeError(f"exited {rc}: {last_line}\n{''.join(log_lines[-30:])}")
        metrics = out / "metrics.jsonl"
        last = max(read_metrics(metrics), default=0) if metrics.is_file() else 0
        if last == total_steps:
            return wall, log_lines, stopped
        stopped.append({"last_step": last, "wall_s": wall, "log_tail": "".join(log_lines[-3:])})
        print(f"[{name}] stopped at step {last} of {total_steps} (a signal from outside?); "
              f"{'running it again' if attempt < retries else 'giving up'}", flush=True)
    raise RuntimeError(f"stopped early {retries + 1} times: {stopped}")


def read_events(path: Path) -> list[dict]:
    """The stage-boundary records of metrics.jsonl (read_metrics merges them into their step's record)."""
    events = []
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            if "event" in record:
                events.append(record)
    return events


def add_step_time(records: list[dict]) -> None:
    """Give every log record `train_s`: the cumulative time of the optimizer steps alone. Each log record's
    window (the steps since the previous one, never across a stage boundary: the trainer logs at every
    boundary) took its tokens / its tokens_per_sec."""
    prev_tokens, total = 0, 0.0
    for r in records:
        if "tokens_per_sec" in r:
            window = r["tokens_seen"] - prev_tokens
            r["window_s"] = window / r["tokens_per_sec"] if r["tokens_per_sec"] > 0 else 0.0
            total += r["window_s"]
            prev_tokens = r["tokens_seen"]
            r["train_s"] = total


def stage_stats(records: list[dict], plan_stages: list[dict]) -> list[dict]:
    out = []
    for s in plan_stages:
        windows = [r for r in records if "window_s" in r and r.get("stage") == s["name"]]
        seconds = sum(r["window_s"] for r in windows)
        tokens = s["steps"] * s["tokens_per_step"]
        out.append({"name": s["name"], "steps": s["steps"], "phase": s["phase"], "step_time_s": seconds,
                    "tokens": tokens, "tokens_per_sec": tokens / seconds if seconds else None,
                    "flops_per_sec": s["steps"] * s["flops_per_step"] / seconds if seconds else None,
                    "ms_per_step": 1000 * seconds / s["steps"] if seconds else None,
                    "log_records": len(windows)})
    return out


def curve(records: list[dict], key: str) -> list[dict]:
    return [{"step": r["step"], "stage": r.get("stage"), "flops": r.get("flops"), key: r[key],
             "elapsed_s": r.get("elapsed_s"), "tokens_seen": r.get("tokens_seen"), "train_s": r.get("train_s")}
            for r in records if key in r]


def first_reach(points: list[dict], x_key: str, target: float) -> tuple[float | None, bool]:
    """x at which the validation loss first reaches `target` (linear in x between validation points);
    (None, False) if never. The flag says the very first point is already at or below the target (x is then
    only an upper bound)."""
    for i, p in enumerate(points):
        if p["val_loss"] <= target:
            if i == 0:
                return p[x_key], True
            q = points[i - 1]
            if q["val_loss"] == p["val_loss"]:
                return p[x_key], False
            return q[x_key] + (q["val_loss"] - target) * (p[x_key] - q[x_key]) / (q["val_loss"] - p["val_loss"]), False
    return None, False


def interp(x: float, xs: list[float], ys: list[float]) -> float | None:
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def equal_flops_steps(arm: str, args, config: Path, out: Path, seed: int, vocab_size: int) -> int:
    """Steps of a one-model arm that spend what --steps steps of the final model spend."""
    if arm not in OWN_MODEL_ARMS:
        return args.steps
    per_step = {a: build_stage_plan(load_config(config, run_overrides(a, out, seed, args.steps, args.val_every,
                                                                       args.log_every)), vocab_size).stages[0]
                .flops_per_step for a in ("full", arm)}
    return round(args.steps * per_step["full"] / per_step[arm])


def run_arm(arm: str, seed: int, args, config: Path, workdir: Path, env: dict, vocab_size: int) -> dict:
    out = workdir / f"{arm}_s{seed}"
    steps = equal_flops_steps(arm, args, config, out, seed, vocab_size)
    overrides = run_overrides(arm, out, seed, steps, args.val_every, args.log_every)
    cfg = load_config(config, overrides)
    plan = build_stage_plan(cfg, vocab_size)
    stages = describe_plan(plan)
    cmd = [sys.executable, "-m", "ppmoe", "train", str(config), "--set", *overrides]
    result = {"arm": arm, "seed": seed, "description": ARMS[arm][0], "command": cmd, "overrides": overrides,
              "output_dir": str(out), "plan": stages, "plan_total_steps": plan.total_steps,
              "plan_flops": sum(s["steps"] * s["flops_per_step"] for s in stages)}
    wall, log_lines, stopped = train_once(f"{arm} s{seed}", cmd, out, plan.total_steps, env, args.verbose,
                                          args.retries)
    if not args.keep_checkpoints:  # only the boundary checkpoints are written; nothing reads them afterwards
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    merged = read_metrics(out / "metrics.jsonl")
    records = [merged[s] for s in sorted(merged)]
    add_step_time(records)
    events = read_events(out / "metrics.jsonl")
    last = records[-1]
    checks = []
    if "val_loss" not in last:
        checks.append(f"no val_loss at the last step {last['step']}")
    if "flops" in last and abs(last["flops"] - result["plan_flops"]) > 1e-6 * result["plan_flops"]:
        checks.append(f"logged FLOPs {last['flops']:.6g} differ from the plan's {result['plan_flops']:.6g}")
    plan_tokens = sum(s["steps"] * s["tokens_per_step"] for s in stages)
    if last.get("tokens_seen") != plan_tokens:
        checks.append(f"logged tokens_seen {last.get('tokens_seen')} differ from the plan's {plan_tokens}")
    for s in stages:
        logged = {r["stage"] for r in records if r["step"] == s["end"] and "stage" in r}
        if logged != {s["name"]}:
            checks.append(f"step {s['end']} (end of stage {s['name']!r}) is logged as stage {logged or 'nothing'}")
    expected_growths = sum(s["grows"] for s in stages)
    growth_events = [e for e in events if e["event"] == "growth"]
    if len(growth_events) != expected_growths:
        checks.append(f"{len(growth_events)} growth records, the plan grows {expected_growths} times")
    growth = []
    for e in growth_events:
        g = {k: e.get(k) for k in ("step", "from_stage", "to_stage", "params_before", "params_after",
                                    "probe_loss_before", "probe_loss_after", "exact", "transform_s", "boundary_s")}
        missing = [k for k, v in g.items() if v is None]
        if missing:
            checks.append(f"growth record at step {e['step']} lacks {', '.join(missing)}")
        if g["probe_loss_before"] is not None and g["probe_loss_after"] is not None:
            g["probe_jump"] = g["probe_loss_after"] - g["probe_loss_before"]
        at = merged.get(e["step"], {})
        g["flops"], g["elapsed_s"], g["train_s"] = at.get("flops"), at.get("elapsed_s"), at.get("train_s")
        growth.append(g)
    val = curve(records, "val_loss")
    if any(p["flops"] is None or p["elapsed_s"] is None for p in val):
        checks.append("some val_loss records carry no flops/elapsed_s (log_every must divide val_every)")
    timing_notes = []
    for s in stages:  # a busy machine shows as log windows far slower than the stage's usual rate
        rates = [r["tokens_per_sec"] for r in records if "window_s" in r and r.get("stage") == s["name"]]
        if len(rates) >= 3:
            median = statistics.median(rates)
            slow = [r for r in rates if r < 0.5 * median]
            if slow:
                timing_notes.append(f"stage {s['name']!r}: {len(slow)} of {len(rates)} log windows ran at under half "
                                    f"the stage's median {median:,.0f} tokens/s (slowest {min(slow):,.0f}): "
                                    f"was the machine busy? wall times are suspect")
    notes = [line.rstrip() for line in log_lines
             if line.startswith(("note:", "warning", "growth into")) or "warning:" in line]
    result.update({
        "wall_s": wall, "stopped_attempts": stopped, "final_step": last["step"], "final_val_loss": last.get("val_loss"),
        "total_flops": last.get("flops"), "total_tokens": last.get("tokens_seen"), "train_loop_s": last.get("elapsed_s"),
        "train_step_s": last.get("train_s"), "steps_per_stage": {s["name"]: s["steps"] for s in stages},
        "stages": stage_stats(records, stages), "val_curve": val, "val_patch_curve": curve(records, "val_patch_loss"),
        "growth": growth, "events": events, "trainer_notes": notes, "checks": checks, "timing_notes": timing_notes,
        "records": records,
    })
    return result


def compare(run: dict, full: dict | None) -> dict:
    """The arm against the full run of the same seed."""
    if full is None or "error" in full or "error" in run or full.get("final_val_loss") is None:
        return {}
    target, budget = full["final_val_loss"], full["total_flops"]
    pts = [p for p in run["val_curve"] if p["flops"] is not None and p["elapsed_s"] is not None]
    c_reach, bounded = first_reach(pts, "flops", target)
    wall_reach, _ = first_reach(pts, "elapsed_s", target)
    step_pts = [p for p in pts if p["train_s"] is not None]
    step_reach, _ = first_reach(step_pts, "train_s", target)
    full_wall, full_step = full["train_loop_s"], full["train_step_s"]
    gap = None if run["final_val_loss"] is None else run["final_val_loss"] - target
    full_pts = [p for p in full["val_curve"] if p["flops"] is not None]
    full_at_run_flops = None
    if run["total_flops"] is not None and full_pts:  # the budgets differ by at most a step's rounding: clamp
        x = min(run["total_flops"], full_pts[-1]["flops"])
        full_at_run_flops = interp(x, [p["flops"] for p in full_pts], [p["val_loss"] for p in full_pts])
    return {
        "target_val_loss": target, "budget_flops": budget, "flops_ratio": run["total_flops"] / budget,
        "flops_to_target": c_reach, "first_point_below_target": bounded,
        "speedup": budget / c_reach if c_reach else None,
        "wall_to_target_s": wall_reach, "wall_speedup": full_wall / wall_reach if wall_reach else None,
        "step_time_to_target_s": step_reach, "step_time_speedup": full_step / step_reach if step_reach else None,
        "val_gap_equal_flops": gap,
        "full_val_at_run_flops": full_at_run_flops,
    }


def stats(values: list) -> dict | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return {"mean": statistics.fmean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "min": min(vals), "max": max(vals), "n": len(vals), "of": len(values), "values": values}


def aggregate(arm: str, runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    agg = {"arm": arm, "seeds": [r["seed"] for r in runs], "failed_seeds": [r["seed"] for r in runs if "error" in r]}
    if not ok:
        return agg
    agg["steps_per_stage"] = ok[0]["steps_per_stage"]
    agg["final_val_loss"] = stats([r["final_val_loss"] for r in ok])
    agg["total_flops"] = stats([r["total_flops"] for r in ok])
    agg["wall_s"] = stats([r["wall_s"] for r in ok])
    agg["train_loop_s"] = stats([r["train_loop_s"] for r in ok])
    for key in ("val_gap_equal_flops", "flops_to_target", "speedup", "wall_to_target_s", "wall_speedup",
                "step_time_to_target_s", "step_time_speedup"):
        agg[key] = stats([r.get("vs_full", {}).get(key) for r in ok]) if any(r.get("vs_full") for r in ok) else None
    jumps = [g.get("probe_jump") for r in ok for g in r["growth"]]
    agg["probe_jump"] = stats(jumps) if jumps else None
    agg["exact"] = sorted({g.get("exact") for r in ok for g in r["growth"]}, key=str) if jumps else None
    agg["stage_tokens_per_sec"] = {s["name"]: stats([next(x["tokens_per_sec"] for x in r["stages"]
                                                          if x["name"] == s["name"]) for r in ok])
                                   for s in ok[0]["stages"]}
    return agg


def fmt(st: dict | None, spec: str, suffix: str = "", signed: bool = False) -> str:
    if st is None:
        return "n/a"
    sign = "+" if signed else ""
    text = f"{st['mean']:{sign}{spec}}{suffix}"
    if st["n"] > 1:
        text += f" ± {st['sd']:{spec}}"
    if st["n"] < st["of"]:
        text += f" ({st['n']}/{st['of']})"
    return text


def table(aggs: list[dict]) -> str:
    head = ["arm", "steps per stage", "final val", "gap vs full", "FLOPs to full's loss", "speed-up",
            "wall to full's loss (s)", "wall speed-up", "step-time speed-up", "probe jump"]
    rows = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for a in aggs:
        if "final_val_loss" not in a:
            rows.append("| " + " | ".join([a["arm"], "FAILED"] + [""] * (len(head) - 2)) + " |")
            continue
        steps = " → ".join(f"{k} {v}" for k, v in a["steps_per_stage"].items())
        reached = a.get("flops_to_target")
        never = "never" if a.get("speedup") is None and a.get("val_gap_equal_flops") is not None else "n/a"
        jump = fmt(a["probe_jump"], ".4f", signed=True) if a["probe_jump"] else "—"
        if a["probe_jump"] and a["exact"] is not None:
            jump += " (exact)" if a["exact"] == [True] else " (not exact)" if a["exact"] == [False] else ""
        rows.append("| " + " | ".join([
            a["arm"], steps, fmt(a["final_val_loss"], ".4f"),
            fmt(a["val_gap_equal_flops"], ".4f", signed=True) if a.get("val_gap_equal_flops") else "n/a",
            fmt(reached, ".3e") if reached else never,
            fmt(a["speedup"], ".2f", "x") if a.get("speedup") else never,
            fmt(a["wall_to_target_s"], ".1f") if a.get("wall_to_target_s") else never,
            fmt(a["wall_speedup"], ".2f", "x") if a.get("wall_speedup") else never,
            fmt(a["step_time_speedup"], ".2f", "x") if a.get("step_time_speedup") else never,
            jump]) + " |")
    return "\n".join(rows)


def plot(path: Path, runs: list[dict], arms: list[str], summary: dict) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.8))
    cmap = plt.get_cmap("tab10")
    colors = {arm: cmap(i) for i, arm in enumerate(ARMS)}
    ok = [r for r in runs if "error" not in r]
    seeds = sorted({r["seed"] for r in ok})
    styles = ["-", "--", ":", "-."]
    panels = ((axes[0], "flops", "cumulative training FLOPs", "validation loss vs training FLOPs"),
              (axes[1], "elapsed_s", "train-loop wall time (s; validation and growth boundaries included)",
               "validation loss vs wall time"))
    all_vals = []
    for ax, key, xlabel, title in panels:
        markers = {}  # legend entries drawn in black, whatever arm they first appear on
        for arm in arms:
            for r in (r for r in ok if r["arm"] == arm):
                pts = [p for p in r["val_curve"] if p[key] is not None]
                if not pts:
                    continue
                xs, ys = [p[key] for p in pts], [p["val_loss"] for p in pts]
                all_vals.extend((p["flops"], p["val_loss"]) for p in pts)
                label = f"{arm} ({' → '.join(f'{k} {v}' for k, v in r['steps_per_stage'].items())} steps)"
                style = styles[seeds.index(r["seed"]) % len(styles)]
                ax.plot(xs, ys, style, marker="o", ms=3, lw=1.4, color=colors[arm],
                        label=label if r["seed"] == seeds[0] else None)
                for g in r["growth"]:
                    gx = g.get(key)
                    if gx is None:
                        continue
                    gy = interp(gx, xs, ys)
                    if gy is None:  # no token-level validation before it (a patch stage): a vertical mark
                        ax.axvline(gx, color=colors[arm], ls=(0, (1, 2)), lw=1.5, zorder=1)
                        markers["patch"] = Line2D([], [], color="black", ls=(0, (1, 2)), lw=1.5,
                                                  label="growth at the patch -> token switch")
                    else:
                        ax.plot([gx], [gy], "D", ms=8, mfc="white", mec=colors[arm], mew=2, zorder=5)
                        markers["growth"] = Line2D([], [], ls="none", marker="D", ms=8, mfc="white", mec="black",
                                                   mew=2, label="growth boundary (on its curve)")
                vs = r.get("vs_full", {})
                rx = vs.get("flops_to_target") if key == "flops" else vs.get("wall_to_target_s")
                if rx is not None and arm != "full":
                    ax.plot([rx], [vs["target_val_loss"]], "x", ms=9, mew=2, color=colors[arm], zorder=6)
                    markers["reach"] = Line2D([], [], ls="none", marker="x", ms=9, mew=2, color="black",
                                              label="reaches full's final loss")
        if summary.get("full_final_val_loss") is not None:
            ax.axhline(summary["full_final_val_loss"], color="gray", ls="--", lw=1,
                       label=f"full's final val loss {summary['full_final_val_loss']:.4f}"
                             + (" (mean over seeds)" if len(seeds) > 1 else ""))
        if key == "flops" and summary.get("budget_flops"):
            ax.axvline(summary["budget_flops"], color="gray", ls=":", lw=1, label="budget C")
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss (token level)")
        ax.grid(alpha=0.3)
        handles, _ = ax.get_legend_handles_labels()
        ax.legend(handles=handles + list(markers.values()), fontsize=7.5, loc="best")
    # the comparison is at the end of the runs: keep the early (high) losses from squashing it
    if all_vals and summary.get("budget_flops"):
        late = [v for f, v in all_vals if f >= 0.25 * summary["budget_flops"]] or [v for _, v in all_vals]
        lo, hi = min(v for _, v in all_vals), max(late)
        pad = 0.08 * max(hi - lo, 0.05)
        for ax in axes:
            ax.set_ylim(lo - pad, hi + 3 * pad)
    patch_note = ("\npatch_compound: a patch-level stage logs next-patch loss only, so its token-level curve starts "
                  "after the switch") if any(r["arm"] == "patch_compound" for r in ok) else ""
    quick = " — QUICK smoke test, not a measurement" if summary.get("quick") else ""
    styles_note = (f"; seeds drawn {', '.join(f'{s} {styles[i % len(styles)]!r}' for i, s in enumerate(seeds))}"
                   if len(seeds) > 1 else "")
    fig.suptitle(f"progressive growth vs full-size training at equal FLOPs{quick}\n{summary['config']}: budget "
                 f"{summary['steps']} final-model steps ({summary['budget_flops']:.3g} FLOPs), seeds "
                 f"{', '.join(map(str, seeds))}{styles_note}, {summary['threads']} threads{patch_note}", fontsize=9.5)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny_growth_cpu.yaml")
    parser.add_argument("--steps", type=int, default=None, help="train.steps, the budget in final-model steps "
                        "(default 600; 40 with --quick)")
    parser.add_argument("--arms", default=",".join(DEFAULT_ARMS),
                        help=f"comma list of {', '.join(ARMS)} (default: {', '.join(DEFAULT_ARMS)})")
    parser.add_argument("--seeds", default="1234", help="comma list of train.seed values; each arm runs per seed")
    parser.add_argument("--val-every", type=int, default=None, help="default 50; 10 with --quick")
    parser.add_argument("--log-every", type=int, default=10,
                        help="metrics records (reduced to a divisor of --val-every, so validations carry FLOPs/time)")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the runs")
    parser.add_argument("--out", default=None, help="output prefix: <out>.json, <out>.png, <out>_runs/ "
                        "(default runs/bench/growth_speedup; runs/bench/growth_speedup_quick with --quick)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 40 steps, validation every 10")
    parser.add_argument("--retries", type=int, default=1, help="re-runs of a run a signal stopped early")
    parser.add_argument("--verbose", action="store_true", help="echo every training line")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep each run's stage-boundary checkpoints (deleted after the run by default)")
    args = parser.parse_args()
    if args.steps is None:
        args.steps = 40 if args.quick else 600
    if args.val_every is None:
        args.val_every = 10 if args.quick else 50
    if args.out is None:
        args.out = "runs/bench/growth_speedup" + ("_quick" if args.quick else "")
    if args.val_every <= 0:
        raise SystemExit("--val-every must be > 0 (the comparison is on validation losses)")
    args.log_every = math.gcd(max(args.log_every, 1), args.val_every)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise SystemExit(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    if "full" in arms:  # the baseline first: the others are measured against it
        arms = ["full"] + [a for a in arms if a != "full"]
    else:
        print("note: no 'full' arm: no comparison against the baseline", flush=True)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]

    prefix = Path(args.out)
    prefix = (prefix if prefix.is_absolute() else REPO / prefix)
    prefix = prefix.with_suffix("") if prefix.suffix in (".json", ".png") else prefix
    json_path, png_path = prefix.parent / f"{prefix.name}.json", prefix.parent / f"{prefix.name}.png"
    workdir = prefix.parent / f"{prefix.name}_runs"
    config = Path(args.config).resolve() if Path(args.config).is_file() else in_repo(args.config)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    base = load_config(config)
    dataset_dir = in_repo(base.data.dataset_dir)
    ensure_dataset(config, dataset_dir, env)
    vocab_size = read_meta(dataset_dir)["vocab_size"]
    for arm in arms:  # config errors (a share too small for a step, a bad override) before any run starts
        build_stage_plan(load_config(config, run_overrides(arm, workdir / arm, seeds[0], args.steps,
                                                           args.val_every, args.log_every)), vocab_size)

    jobs = [(seed, arm) for seed in seeds for arm in arms]
    print(f"{len(jobs)} runs ({', '.join(arms)} x seeds {', '.join(map(str, seeds))}), {args.steps} final-model "
          f"steps each, validation every {args.val_every}, {args.threads} threads; runs in {workdir}", flush=True)
    runs: list[dict] = []
    started = time.perf_counter()
    for i, (seed, arm) in enumerate(jobs, 1):
        try:
            run = run_arm(arm, seed, args, config, workdir, env, vocab_size)
        except Exception as e:  # keep going: one broken arm should not cost the others
            run = {"arm": arm, "seed": seed, "error": f"{type(e).__name__}: {e}"}
        if "error" not in run:
            full = next((r for r in runs if r["arm"] == "full" and r["seed"] == seed), None)
            run["vs_full"] = compare(run, full) if arm != "full" else compare(run, run)
        runs.append(run)
        head = f"[{i}/{len(jobs)}] {arm} s{seed}:"
        if "error" in run:
            print(f"{head} FAILED: {run['error'].splitlines()[0]} (log: {workdir / f'{arm}_s{seed}' / 'train.log'})",
                  flush=True)
            continue
        vs = run["vs_full"]
        speed = ("" if arm == "full" or not vs else f", full's final loss at {vs['speedup']:.2f}x fewer FLOPs"
                 if vs.get("speedup") else ", never reaches full's final loss")
        jump = "".join(f", probe {g['probe_loss_before']:.3f} -> {g['probe_loss_after']:.3f}" for g in run["growth"])
        fv = run["final_val_loss"]
        print(f"{head} {' + '.join(f'{k} {v}' for k, v in run['steps_per_stage'].items())} steps, final val "
              f"{fv:.4f}" if fv is not None else f"{head} no final val", end="")
        print(f", {run['total_flops']:.3e} FLOPs, {run['wall_s']:.1f} s{jump}{speed}"
              + (f"; CHECK: {'; '.join(run['checks'])}" if run["checks"] else "")
              + (f"; timing: {'; '.join(run['timing_notes'])}" if run["timing_notes"] else ""), flush=True)

    aggs = [aggregate(arm, [r for r in runs if r["arm"] == arm]) for arm in arms]
    full_runs = [r for r in runs if r["arm"] == "full" and "error" not in r]
    summary = {"config": args.config, "steps": args.steps, "seeds": seeds, "arms": arms, "val_every": args.val_every,
               "log_every": args.log_every, "threads": args.threads, "quick": args.quick,
               "budget_flops": statistics.fmean(r["total_flops"] for r in full_runs) if full_runs else
               next((r["plan_flops"] for r in runs if "plan_flops" in r), None),
               "full_final_val_loss": statistics.fmean(r["final_val_loss"] for r in full_runs) if full_runs else None,
               "benchmark_wall_s": time.perf_counter() - started}
    written = plot(png_path, runs, arms, summary)
    doc = {
        "description": __doc__.split("\n\n")[0],
        "command_line": [sys.executable, *sys.argv],
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "machine": platform.machine(), "cpu_count": os.cpu_count(), "omp_num_threads": args.threads},
        "arms": {a: {"description": ARMS[a][0], "overrides": ARMS[a][1]} for a in arms},
        "summary": summary, "aggregates": aggs, "plot": written, "runs": runs,
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(doc, indent=1))

    print()
    print(f"Progressive growth vs full-size training at equal FLOPs ({args.config}, {args.steps} final-model steps = "
          f"{summary['budget_flops']:.3e} FLOPs, seeds {', '.join(map(str, seeds))}, {args.threads} threads"
          f"{', QUICK smoke test' if args.quick else ''})")
    print()
    print(table(aggs))
    print()
    print("speed-ups are the full run's FLOPs / wall time / step time at its final val loss over the arm's at "
          "the same loss (interpolated between validations); gap = arm's final val - full's final val.")
    for a in aggs:
        tps = a.get("stage_tokens_per_sec")
        if tps:
            print(f"  {a['arm']}: tokens/s per stage: "
                  + ", ".join(f"{k} {fmt(v, ',.0f')}" for k, v in tps.items()))
    problems = [(r["arm"], r["seed"], c) for r in runs for c in r.get("checks", [])]
    problems += [(r["arm"], r["seed"], r["error"].splitlines()[0]) for r in runs if "error" in r]
    for arm, seed, c in problems:
        print(f"  CHECK {arm} s{seed}: {c}")
    for r in runs:
        for note in r.get("timing_notes", []):
            print(f"  timing {r['arm']} s{r['seed']}: {note}")
    if args.quick:
        print("(quick smoke test: a check that the script and the machinery run, not a measurement)")
    print(f"wrote {json_path}")
    print(f"wrote {written}" if written else f"matplotlib is not installed: no plot written ({png_path}); "
          f"pip install matplotlib")
    if any("error" in r for r in runs):
        sys.exit(1)


if __name__ == "__main__":
    main()
