"""One figure of one or more runs (`python -m ppmoe plot RUN_DIR ... --out FILE.png`).

Panels, in a grid three wide:
1-3. loss against steps, against tokens seen, against FLOPs (log x): each run in its own colour, training
     loss as a line, validation loss as a line with dots. Patch-phase losses (phase "patch", and
     val_patch_loss) are next-patch losses, not comparable with token losses: dashed, and the figure's
     legend says so.
4.   tokens/s against steps (dashed in the patch phase, whose tokens/s counts each patch's K tokens).
5.   per MoE run, its expert-load heatmap (see expert_load.py).
Every panel with a step, token or FLOPs axis marks the runs' stage boundaries (boundary records, and
changes of stage or phase between consecutive records) with a dotted vertical line in the run's colour,
labelled with what changed ("small → moe (growth)").

The figure is drawn on matplotlib's Figure directly, never through pyplot: no display, no global figure
state, and savefig renders with Agg (for PNG).
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import EngFormatter

from ..errors import PpmoeError
from .expert_load import draw_expert_load
from .runs import Run, boundaries, load_run, phase_segments

AXES = {"step": "step", "tokens_seen": "tokens seen", "flops": "FLOPs (cumulative)"}
LOSS_KEYS = {"token": "val_loss", "patch": "val_patch_loss"}
PHASE_STYLE = {"token": "-", "patch": "--"}
BOUNDARY_GID = "boundary"  # the gid of a boundary's vertical line (tests find them by it)


def style_legend() -> list[Line2D]:
    """What the line styles mean, shared by all runs (the colours are the runs: each panel's legend)."""
    return [Line2D([], [], color="grey", linestyle="-", label="train loss"),
            Line2D([], [], color="grey", linestyle="-", marker="o", markersize=4, label="validation loss"),
            Line2D([], [], color="grey", linestyle="--",
                   label="patch phase: next-patch loss, not comparable with token losses"),
            Line2D([], [], color="grey", linestyle=":", label="stage boundary")]


def legend_segment(segments) -> int:
    """Which of a run's phase segments carries its name into the legend (one entry per run): the first
    token-phase one, so the entry is the run's colour as a solid line, else the first."""
    return next((i for i, (phase, _) in enumerate(segments) if phase == "token"), 0)


def draw_boundaries(ax: Axes, run: Run, axis: str, color, drawn: set) -> None:
    """The run's boundaries as vertical lines at their x on `axis`; a label already drawn at the same place
    (another run with the same boundary) is not written twice."""
    found = boundaries(run)
    xs = run.x_at(axis, [b.step for b in found]) if found else None
    if xs is None:
        return
    for b, x in zip(found, xs):
        ax.axvline(x, color=color, linestyle=":", linewidth=1.2, gid=BOUNDARY_GID)
        if (x, b.label) not in drawn:
            drawn.add((x, b.label))
            # at the bottom: losses fall, so the lower left is where the curves are not; a white box keeps
            # the label readable where a curve does pass
            ax.text(x, 0.02, b.label, transform=ax.get_xaxis_transform(), rotation=90, va="bottom", ha="right",
                    fontsize=7, color=color, bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8,
                                                   "pad": 1.0})


def draw_losses(ax: Axes, run: Run, axis: str, color) -> bool:
    """The run's training and validation losses against `axis`; False when the run has no `axis` field."""
    if run.x_at(axis, [0]) is None:
        return False
    segments = phase_segments(run.with_field("loss"))
    named = legend_segment(segments)
    for i, (phase, records) in enumerate(segments):
        x = run.x_at(axis, [r["step"] for r in records])
        ax.plot(x, [r["loss"] for r in records], color=color, linestyle=PHASE_STYLE.get(phase, "-"), linewidth=1.4,
                label=run.name if i == named else "_nolegend_")
    for phase, key in LOSS_KEYS.items():
        records = run.with_field(key)
        if records:
            ax.plot(run.x_at(axis, [r["step"] for r in records]), [r[key] for r in records], color=color,
                    linestyle=PHASE_STYLE.get(phase, "-"), marker="o", markersize=4, linewidth=1.0, label="_nolegend_")
    return True


def loss_panel(ax: Axes, runs: list[Run], colors, axis: str) -> None:
    drawn: set = set()
    plotted = [draw_losses(ax, run, axis, color) for run, color in zip(runs, colors)]
    if not any(plotted):
        ax.text(0.5, 0.5, f"no run logged {axis}", transform=ax.transAxes, ha="center", va="center")
    for run, color, ok in zip(runs, colors, plotted):
        if ok:
            draw_boundaries(ax, run, axis, color, drawn)
    ax.set_xlabel(AXES[axis])
    ax.set_ylabel("loss")
    ax.set_title(f"loss vs {AXES[axis].split(' (')[0]}")
    if axis == "flops":
        ax.set_xscale("log")
    elif axis == "tokens_seen":
        ax.xaxis.set_major_formatter(EngFormatter())
    ax.grid(alpha=0.3)
    if any(plotted):
        ax.legend(fontsize=8, loc="upper right")  # where falling losses leave room


def throughput_panel(ax: Axes, runs: list[Run], colors) -> None:
    drawn: set = set()
    for run, color in zip(runs, colors):
        segments = phase_segments(run.with_field("tokens_per_sec"))
        named = legend_segment(segments)
        for i, (phase, records) in enumerate(segments):
            ax.plot([r["step"] for r in records], [r["tokens_per_sec"] for r in records], color=color,
                    linestyle=PHASE_STYLE.get(phase, "-"), linewidth=1.2,
                    label=run.name if i == named else "_nolegend_")
        draw_boundaries(ax, run, "step", color, drawn)
    ax.set_xlabel("step")
    ax.set_ylabel("tokens/s")
    ax.set_title("throughput")
    ax.yaxis.set_major_formatter(EngFormatter())
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")


def build_figure(runs: list[Run]) -> Figure:
    """The figure of `runs` (see the module docstring for its panels)."""
    moe = [run for run in runs if run.has_moe]
    lower = 1 + len(moe)  # panels below the loss row: throughput, then one heatmap per MoE run
    rows = 1 + (1 if lower <= 3 else -(-lower // 3))
    fig = Figure(figsize=(18, 4.8 * rows + 0.6), layout="constrained")
    grid = fig.add_gridspec(rows, 3)
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for col, axis in enumerate(AXES):
        loss_panel(fig.add_subplot(grid[0, col]), runs, colors, axis)
    # the lower row: throughput alone spans it; with one heatmap, the heatmap gets two columns (time reads
    # better wide); with more, three panels a row
    if lower == 1:
        slots = [grid[1, :]]
    elif lower == 2:
        slots = [grid[1, 0], grid[1, 1:]]
    else:
        slots = [grid[1 + i // 3, i % 3] for i in range(lower)]
    throughput_panel(fig.add_subplot(slots[0]), runs, colors)
    for run, slot in zip(moe, slots[1:]):
        draw_expert_load(fig, fig.add_subplot(slot), run)
    fig.legend(handles=style_legend(), loc="outside upper center", ncols=4, fontsize=9, frameon=False)
    return fig


def check_output(out: Path) -> None:
    """Refuse an output path matplotlib cannot write, before reading any run."""
    if not out.parent.is_dir():
        raise PpmoeError(f"--out {out}: the directory {out.parent} does not exist: create it (mkdir -p "
                         f"{out.parent}) or write the figure somewhere that exists")
    formats = Figure().canvas.get_supported_filetypes()
    if out.suffix.lstrip(".").lower() not in formats:
        suffixes = ", ".join("." + f for f in sorted(formats))
        raise PpmoeError(f"--out {out}: give a file name ending in one of {suffixes} (e.g. .png)")


def plot_runs(run_dirs: list[Path], out: Path, labels: list[str] | None = None) -> Path:
    """Draw the runs in `run_dirs` (each a run's output_dir, holding metrics.jsonl) on one figure and save it
    to `out` (its format from the suffix: .png, .pdf, .svg, ...). `labels` name the runs in the legends
    (default: each directory's name). Returns `out`."""
    out = Path(out)
    if not run_dirs:
        raise PpmoeError("plot: give at least one run directory (a run's output_dir, with metrics.jsonl)")
    if labels is not None and len(labels) != len(run_dirs):
        raise PpmoeError(f"plot: {len(labels)} label(s) for {len(run_dirs)} run directories: give one per run, "
                         f"in the same order, or none")
    check_output(out)
    runs = [load_run(d, labels[i] if labels else None) for i, d in enumerate(run_dirs)]
    build_figure(runs).savefig(out, dpi=100)
    return out

