"""Patch-level training (patchtrain/, K tokens per patch, lambda of the tokens at patch level) against
token-level training on the same tokens: throughput of the two phases, FLOPs, wall time and loss.

    python benchmarks/patch_speedup.py [--config configs/tiny_patch_cpu.yaml] [--token-steps 600] \
        [--val-every CONFIG'S] [--log-every 10] [--set key=value ...] [--threads N] [--retries 2] \
        [--out runs/bench/patch_speedup.json] [--plot runs/bench/patch_speedup.png]

Two real single-process runs of `python -m ppmoe train CONFIG --set ...` (subprocesses, OMP_NUM_THREADS =
--threads), in fresh output directories under <dir of --out>/patch_speedup_runs/{token,patch} (deleted and
recreated each time; train.resume=none, checkpoint.every=0, checkpoint.save_final=false), on the prepared
dataset (`ppmoe prepare CONFIG` is run first if its meta.json is missing). A run that a signal stopped
early (the trainer saves and exits 0 on SIGTERM/SIGUSR1) is run again from scratch (--retries). Both use the config's model,
batch (global_batch_size B sequences of seq_len T) and optimizer, the same --log-every and --val-every:

  token run  patch.fraction=0, train.steps=--token-steps (n): N = n * B * T training tokens.
  patch run  the config's patch.size K and patch.fraction lambda, train.steps = round(n * (lambda/K + 1 -
             lambda)); ppmoe.train.plan.build_stage_plan splits it into the patch phase (each step reads K*T
             tokens per sequence) and the token phase. The script asserts the plan's tokens equal N within
             one patch step's tokens (K * B * T).

Every step of either run costs the same FLOPs (the trainer's `flops`, T positions per sequence), so the
patch run's FLOPs relative to the token run is its step count over n (lambda/K + 1 - lambda = 0.5 at K=4,
lambda=2/3).

Measured:
- Throughput: in the patch run alone (same model, same process), the median of `tokens_per_sec`
  (tokens, not patches; each record covers the steps since the previous record, training steps only,
  validation excluded) over the patch-phase records vs over the token-phase records; records whose window
  straddles the phase switch are dropped. The ratio's theoretical limit is K. The token run's median
  tokens/s is shown as a cross-check, with the patch phase's ratio to it (a note is printed when the
  patch run's token phase and the token run differ by more than 10%).
- Quality at equal tokens: the token-level validation loss (`val_loss`, train.val_batches batches of the
  held-out split) at the last step of each run, both having read N training tokens.
- Quality at equal compute: the token run's val_loss at the patch run's total FLOPs, linearly interpolated
  in FLOPs between the token run's validation points (exact when --val-every divides the patch run's
  steps), against the patch run's final val_loss.
- FLOPs (cumulative training FLOPs, validation not counted) and wall time: the subprocess's wall clock
  (start-up, data, validation and the checkpoint the trainer always writes at the phase switch included)
  and the trainer's own `elapsed_s` at the last step.
- Curves: training loss and validation loss of both runs against cumulative FLOPs (the patch run's
  patch-phase training loss and `val_patch_loss` are next-patch losses, drawn dashed / hollow, not
  comparable with token losses), and val_loss against training tokens, in one PNG (needs matplotlib;
  without it the plot is skipped with a message and the JSON and table are still written).

Writes JSON (commands, overrides, the plan, every merged metrics record of both runs, the summary) and
prints a table.
"""

from __future__ import annotations

import argparse
import json
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

from patchtrain.schedule import patch_phase_steps  # noqa: E402
from ppmoe.train.plan import build_stage_plan  # noqa: E402
from ppmoe.config import load_config  # noqa: E402
from ppmoe.data import read_meta  # noqa: E402
from ppmoe.model import model_shape, training_flops_per_token  # noqa: E402
from ppmoe.train.metrics import read_metrics  # noqa: E402


def overrides_common(out: Path, log_every: int, val_every: int, extra: list[str]) -> list[str]:
    return [f"output_dir={out}", "train.resume=none", "checkpoint.every=0", "checkpoint.save_final=false",
            f"train.log_every={log_every}", f"train.val_every={val_every}", *extra]


def in_repo(path: str | Path) -> Path:
    """Relative paths in configs are relative to the repository (the runs' working directory)."""
    path = Path(path)
    return path if path.is_absolute() else REPO / path


def ensure_dataset(config: Path, dataset_dir: Path, extra: list[str], env: dict) -> None:
    if (dataset_dir / "meta.json").is_file():
        return
    cmd = [sys.executable, "-m", "ppmoe", "prepare", str(config), *(["--set", *extra] if extra else [])]
    print(f"{dataset_dir / 'meta.json'} missing: {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, cwd=REPO, env=env, check=True)


def run_train(name: str, config: Path, overrides: list[str], steps: int, out: Path, env: dict, verbose: bool,
              retries: int) -> dict:
    """One `ppmoe train` subprocess in a fresh `out`; returns its command, wall time and merged records.
    A run that a signal stopped early (the trainer saves and exits 0 on SIGTERM/SIGUSR1) is run again
    from scratch, up to `retries` times."""
    cmd = [sys.executable, "-m", "ppmoe", "train", str(config), "--set", *overrides]
    stopped = []
    for attempt in range(retries + 1):
        if out.exists():
            shutil.rmtree(out)  # metrics.jsonl is appended to: a stale one would mix runs
        out.mkdir(parents=True)
        print(f"[{name}] {' '.join(cmd)}", flush=True)
        log_lines = []
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            log_lines.append(line)
            if verbose or " val" in line or "phase done" in line or "stop requested" in line:
                print(f"[{name}] {line.rstrip()}", flush=True)
        rc = proc.wait()
        wall = time.perf_counter() - start
        (out / "train.log").write_text("".join(log_lines))
        if rc != 0:
            raise RuntimeError(f"[{name}] exited {rc}:\n{''.join(log_lines[-40:])}")
        records = read_metrics(out / "metrics.jsonl")
        if max(records, default=0) == steps:
            print(f"[{name}] done in {wall:.1f}s", flush=True)
            return {"name": name, "command": cmd, "overrides": overrides, "output_dir": str(out), "wall_s": wall,
                    "stopped_attempts": stopped, "records": [records[s] for s in sorted(records)]}
        stopped.append({"last_step": max(records, default=0), "wall_s": wall,
                        "log_tail": "".join(log_lines[-3:])})
        print(f"[{name}] stopped at step {max(records, default=0)} of {steps} (a signal from outside?); "
              f"{'running it again' if attempt < retries else 'giving up'}", flush=True)
    raise RuntimeError(f"[{name}] stopped early {retries + 1} times: {stopped}")


def tokens_at(step: int, phases, tokens_per_token_step: int) -> int:
    """Training tokens read after `step` optimizer steps under the plan."""
    total = 0
    for ph in phases:
        total += max(0, min(step, ph.end) - ph.start) * ph.patch_size * tokens_per_token_step
    return total


def stage_summary(stage) -> dict:
    return {"name": stage.name, "phase": stage.phase, "start": stage.start, "steps": stage.steps,
            "patch_size": stage.patch_size}


def phase_of(step: int, phases) -> str:
    for ph in phases:
        if step <= ph.end:
            return ph.phase
    return phases[-1].phase


def pure_window_rates(records: list[dict], phases) -> dict[str, list[float]]:
    """tokens_per_sec of the training records, by phase, keeping only windows inside one phase."""
    rates: dict[str, list[float]] = {ph.phase: [] for ph in phases}
    prev = 0
    for r in records:
        if "tokens_per_sec" not in r:
            continue
        first, last = prev + 1, r["step"]
        if phase_of(first, phases) == phase_of(last, phases) == r["phase"]:
            rates[r["phase"]].append(r["tokens_per_sec"])
        prev = last
    return rates


def interpolate(x: float, xs: list[float], ys: list[float]) -> float | None:
    """Linear interpolation of y at x over increasing xs; None outside [xs[0], xs[-1]]."""
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    if xs and x == xs[-1]:
        return ys[-1]
    return None


def annotate(run: dict, phases, tokens_per_token_step: int, flops_per_step: float) -> None:
    """Give every record tokens/flops from its step (validation-only records carry neither) and check them
    against the ones the trainer logged."""
    for r in run["records"]:
        tok, fl = tokens_at(r["step"], phases, tokens_per_token_step), r["step"] * flops_per_step
        if "tokens_seen" in r:
            assert r["tokens_seen"] == tok, (run["name"], r["step"], r["tokens_seen"], tok)
            assert abs(r["flops"] - fl) <= 1e-6 * fl, (run["name"], r["step"], r["flops"], fl)
        r.setdefault("tokens_seen", tok)
        r.setdefault("flops", fl)
        r.setdefault("phase", phase_of(r["step"], phases))


def val_points(run: dict, key: str = "val_loss") -> tuple[list[float], list[int], list[float]]:
    pts = [(r["flops"], r["tokens_seen"], r[key]) for r in run["records"] if key in r]
    return [p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts]


def plot(path: Path, token: dict, patch: dict, summary: dict) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    colors = {"token": "tab:blue", "patch": "tab:orange"}
    labels = {"token": f"token-level ({summary['token_steps']} steps)",
              "patch": f"patch K={summary['K']}, λ={summary['lambda']:.3g} ({summary['patch_run_steps']} steps)"}
    ax = axes[0]
    for run in (token, patch):
        name = run["name"]
        for phase, style in (("patch", "--"), ("token", "-")):
            pts = [(r["flops"], r["loss"]) for r in run["records"] if "loss" in r and r["phase"] == phase]
            if pts:
                lab = labels[name] + (" — patch phase (next-patch loss)" if phase == "patch" else "")
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=colors[name], label=lab, lw=1.3)
    ax.set_title("training loss vs FLOPs")
    ax.set_xlabel("cumulative training FLOPs")
    ax.set_ylabel("loss")
    def plot_val(ax, x_of, title: str, xlabel: str) -> None:
        """Both runs' val_loss and the patch run's val_patch_loss against x_of(flops, tokens)."""
        for run in (token, patch):
            f, t, v = val_points(run)
            ax.plot(x_of(f, t), v, "o-", color=colors[run["name"]], label=labels[run["name"]] + " val_loss", ms=4)
        f, t, v = val_points(patch, "val_patch_loss")
        if f:
            ax.plot(x_of(f, t), v, "o--", color=colors["patch"], mfc="none",
                    label="patch run val_patch_loss (next-patch)", ms=5)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("val loss")

    plot_val(axes[1], lambda f, t: f, "validation loss vs FLOPs", "cumulative training FLOPs")
    axes[1].axvline(summary["patch_run_flops"], color="gray", ls=":", lw=1)
    if summary["token_val_at_patch_flops"] is not None:
        axes[1].plot([summary["patch_run_flops"]], [summary["token_val_at_patch_flops"]], "x",
                     color=colors["token"], ms=10, mew=2, label="token run at the patch run's FLOPs (interp.)")
    plot_val(axes[2], lambda f, t: t, "validation loss vs training tokens", "training tokens read")
    for a in axes:
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    # the token-level losses are what is compared: keep the early (high) patch-phase losses from squashing them
    token_losses = [r[k] for run in (token, patch) for r in run["records"] for k in ("loss", "val_loss")
                    if k in r and r["phase"] == "token"]
    if token_losses:
        hi = max(max(token_losses), summary["token_final_val_loss"] + 1.0)
        lo = min(token_losses) - 0.1
        for a in axes:
            a.set_ylim(lo, min(a.get_ylim()[1], hi + 0.5))
    fig.suptitle(f"patch-level vs token-level training, {summary['tokens']:,} tokens each "
                 f"({summary['config']})", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny_patch_cpu.yaml")
    parser.add_argument("--token-steps", type=int, default=600, help="optimizer steps of the token-level run")
    parser.add_argument("--val-every", type=int, default=None, help="both runs; default: the config's")
    parser.add_argument("--log-every", type=int, default=10, help="both runs (metrics records)")
    parser.add_argument("--set", nargs="+", default=[], dest="extra", help="overrides for both runs")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="OMP_NUM_THREADS of the runs")
    parser.add_argument("--out", default="runs/bench/patch_speedup.json")
    parser.add_argument("--plot", default="runs/bench/patch_speedup.png")
    parser.add_argument("--verbose", action="store_true", help="echo every training line")
    parser.add_argument("--retries", type=int, default=2, help="re-runs of a run a signal stopped early")
    args = parser.parse_args()

    out, plot_path = Path(args.out).resolve(), Path(args.plot).resolve()
    workdir = out.parent / "patch_speedup_runs"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    config_path = Path(args.config).resolve() if Path(args.config).is_file() else in_repo(args.config)

    base = load_config(config_path, args.extra)
    t, K, lam = base.train, base.patch.size, base.patch.fraction
    if K < 2 or lam <= 0:
        raise SystemExit(f"{args.config}: needs a patch phase (patch.size >= 2, patch.fraction > 0); "
                         f"got size {K}, fraction {lam}")
    val_every = args.val_every if args.val_every is not None else t.val_every
    if val_every <= 0:
        raise SystemExit("--val-every must be > 0 (both runs must log val_loss)")
    n = args.token_steps
    tokens_per_token_step = t.global_batch_size * t.seq_len
    N = n * tokens_per_token_step
    cost = lam / K + 1.0 - lam
    patch_steps_total = round(n * cost)

    token_over = overrides_common(workdir / "token", args.log_every, val_every, args.extra) + [
        "patch.fraction=0", f"train.steps={n}"]
    patch_over = overrides_common(workdir / "patch", args.log_every, val_every, args.extra) + [
        f"train.steps={patch_steps_total}"]
    token_cfg, patch_cfg = load_config(config_path, token_over), load_config(config_path, patch_over)
    # every step costs the same in both runs (T positions per sequence); the vocabulary is the dataset's
    dataset_dir = in_repo(token_cfg.data.dataset_dir)
    ensure_dataset(config_path, dataset_dir, args.extra, env)
    vocab = read_meta(dataset_dir)["vocab_size"]
    token_stages = build_stage_plan(token_cfg, vocab).stages
    patch_stages = build_stage_plan(patch_cfg, vocab).stages
    assert [p.phase for p in token_stages] == ["token"], token_stages
    assert [p.phase for p in patch_stages] == ["patch", "token"], patch_stages
    assert patch_stages[0].steps == patch_phase_steps(patch_steps_total, K, lam)
    patch_tokens = tokens_at(patch_steps_total, patch_stages, tokens_per_token_step)
    assert tokens_at(n, token_stages, tokens_per_token_step) == N
    assert abs(patch_tokens - N) <= K * tokens_per_token_step, (
        f"the patch plan reads {patch_tokens:,} tokens, the token run {N:,}: more than one patch step apart")
    shape = model_shape(token_cfg, vocab)
    flops_per_step = training_flops_per_token(shape, t.seq_len) * tokens_per_token_step

    token = run_train("token", config_path, token_over, n, workdir / "token", env, args.verbose, args.retries)
    patch = run_train("patch", config_path, patch_over, patch_steps_total, workdir / "patch", env, args.verbose,
                      args.retries)
    annotate(token, token_stages, tokens_per_token_step, flops_per_step)
    annotate(patch, patch_stages, tokens_per_token_step, flops_per_step)
    for run, steps in ((token, n), (patch, patch_steps_total)):
        last = run["records"][-1]
        assert last["step"] == steps and "val_loss" in last, f"{run['name']}: no val_loss at the last step {steps}"
        assert last["phase"] == "token", last

    # throughput, one run (the patch run), both phases
    rates = pure_window_rates(patch["records"], patch_stages)
    token_rates = pure_window_rates(token["records"], token_stages)["token"]
    tps_patch, tps_token = statistics.median(rates["patch"]), statistics.median(rates["token"])

    tf, tt, tv = val_points(token)
    patch_last, token_last = patch["records"][-1], token["records"][-1]
    token_at_patch_flops = interpolate(patch_last["flops"], tf, tv)
    summary = {
        "config": args.config, "K": K, "lambda": lam, "token_steps": n, "patch_run_steps": patch_steps_total,
        "patch_phase_steps": patch_stages[0].steps, "token_phase_steps": patch_stages[1].steps,
        "tokens": N, "patch_run_tokens": patch_tokens, "tokens_per_token_step": tokens_per_token_step,
        "val_every": val_every, "log_every": args.log_every, "threads": args.threads,
        "throughput": {
            "patch_phase_tokens_per_sec_median": tps_patch, "token_phase_tokens_per_sec_median": tps_token,
            "ratio": tps_patch / tps_token, "theoretical_limit": K,
            "patch_phase_records": rates["patch"], "token_phase_records": rates["token"],
            "token_run_tokens_per_sec_median": statistics.median(token_rates),
            "ratio_vs_token_run": tps_patch / statistics.median(token_rates),
            "token_phase_vs_token_run": tps_token / statistics.median(token_rates),
        },
        "token_run_flops": token_last["flops"], "patch_run_flops": patch_last["flops"],
        "flops_ratio": patch_last["flops"] / token_last["flops"], "flops_ratio_theory": cost,
        "token_wall_s": token["wall_s"], "patch_wall_s": patch["wall_s"],
        "wall_ratio": patch["wall_s"] / token["wall_s"],
        "token_train_loop_s": token_last.get("elapsed_s"), "patch_train_loop_s": patch_last.get("elapsed_s"),
        "token_final_val_loss": token_last["val_loss"], "patch_final_val_loss": patch_last["val_loss"],
        "token_val_at_patch_flops": token_at_patch_flops,
        "token_val_at_patch_flops_exact": patch_last["flops"] in tf,
    }
    summary["patch_minus_token_equal_tokens"] = summary["patch_final_val_loss"] - summary["token_final_val_loss"]
    if token_at_patch_flops is not None:
        summary["patch_minus_token_equal_flops"] = summary["patch_final_val_loss"] - token_at_patch_flops

    written_plot = plot(plot_path, token, patch, summary)
    summary["plot"] = written_plot
    doc = {
        "description": __doc__.split("\n\n")[0], "summary": summary,
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "machine": platform.machine(), "cpu_count": os.cpu_count(), "omp_num_threads": args.threads},
        "plan": {"token": [stage_summary(p) for p in token_stages], "patch": [stage_summary(p) for p in patch_stages],
                 "reset_schedule": patch_cfg.patch.reset_schedule, "reset_optimizer": patch_cfg.patch.reset_optimizer},
        "extra_overrides": args.extra,
        "runs": {"token": token, "patch": patch},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2))

    s, th = summary, summary["throughput"]
    print()
    print(f"patch-level (K={K}, lambda={lam:g}: {s['patch_phase_steps']} patch + {s['token_phase_steps']} token steps) "
          f"vs token-level ({n} steps), {N:,} tokens each ({s['patch_run_tokens']:,} in the patch plan), "
          f"{args.config}, {args.threads} threads")
    print("throughput, patch run (median tokens/s of the log records of each phase):")
    print(f"  patch phase {th['patch_phase_tokens_per_sec_median']:>10,.0f}  ({len(th['patch_phase_records'])} records)")
    print(f"  token phase {th['token_phase_tokens_per_sec_median']:>10,.0f}  ({len(th['token_phase_records'])} records)"
          f"   [token run: {th['token_run_tokens_per_sec_median']:,.0f}]")
    print(f"  ratio       {th['ratio']:>10.2f}x (limit {K}x)   [patch phase / token run: {th['ratio_vs_token_run']:.2f}x]")
    if abs(th["token_phase_vs_token_run"] - 1) > 0.1:
        print(f"  note: the patch run's token phase ran at {th['token_phase_vs_token_run']:.2f}x the token run's "
              f"tokens/s (same steps, same model): the in-run ratio is skewed by that")
    print(f"{'':<34} {'token run':>12} {'patch run':>12} {'patch/token':>12}")
    print(f"{'optimizer steps':<34} {n:>12} {patch_steps_total:>12} {patch_steps_total / n:>12.3f}")
    print(f"{'training FLOPs':<34} {s['token_run_flops']:>12.3e} {s['patch_run_flops']:>12.3e} "
          f"{s['flops_ratio']:>12.3f}   (theory {cost:.3f})")
    print(f"{'wall time, process (s)':<34} {s['token_wall_s']:>12.1f} {s['patch_wall_s']:>12.1f} {s['wall_ratio']:>12.3f}")
    if s["token_train_loop_s"] and s["patch_train_loop_s"]:
        print(f"{'train loop to last step (s)':<34} {s['token_train_loop_s']:>12.1f} {s['patch_train_loop_s']:>12.1f} "
              f"{s['patch_train_loop_s'] / s['token_train_loop_s']:>12.3f}")
    print(f"{'final val_loss (equal tokens)':<34} {s['token_final_val_loss']:>12.4f} {s['patch_final_val_loss']:>12.4f} "
          f"{s['patch_minus_token_equal_tokens']:>+12.4f} (diff)")
    if token_at_patch_flops is not None:
        how = "at" if s["token_val_at_patch_flops_exact"] else "interp."
        print(f"{'val_loss at patch-run FLOPs':<34} {token_at_patch_flops:>12.4f} {s['patch_final_val_loss']:>12.4f} "
              f"{s['patch_minus_token_equal_flops']:>+12.4f} (diff; token run {how} {s['patch_run_flops']:.3e})")
    print(f"wrote {out}")
    if written_plot:
        print(f"wrote {written_plot}")
    else:
        print(f"matplotlib is not installed: no plot written ({plot_path}); pip install matplotlib")


if __name__ == "__main__":
    main()
