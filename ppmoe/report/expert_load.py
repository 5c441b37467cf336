"""The expert-load heatmap of one MoE run: which experts took more or less than their share, and when.

One heatmap per run, one row per expert, grouped by MoE layer (layer 0 on top, a black line between
layers), one column per logged step (x = step). The colour is an expert's share of its layer's tokens
over the fair share 1/E: 1 (white) is balanced, blue took less, red more; the colour scale is centred on
1 and reaches at least 2, so one balanced run looks pale. One heatmap per run rather than one per layer
keeps a 2-layer x 8-expert run and a 24-layer x 64-expert one each on one panel. Steps beyond
MAX_COLUMNS are averaged in equal groups of consecutive logged steps, so a long run stays a readable picture.
"""

from __future__ import annotations

import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

from .runs import Run

MAX_COLUMNS = 400


def step_edges(steps: np.ndarray) -> np.ndarray:
    """Column edges halfway between logged steps (logging is not evenly spaced: boundaries, the last step)."""
    if len(steps) == 1:
        return np.array([steps[0] - 0.5, steps[0] + 0.5])
    mid = (steps[1:] + steps[:-1]) / 2
    return np.concatenate([[2 * steps[0] - mid[0]], mid, [2 * steps[-1] - mid[-1]]])


def load_matrix(run: Run, max_columns: int = MAX_COLUMNS) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(column edges [T+1], load over fair share [layers x experts, T], layers, experts). Layers with fewer
    experts than the widest (none today) leave their missing rows empty (NaN)."""
    records = [r for r in run.records if r.get("expert_load")]
    layers = max(len(r["expert_load"]) for r in records)
    experts = max(len(row) for r in records for row in r["expert_load"])
    matrix = np.full((layers * experts, len(records)), np.nan)
    for t, record in enumerate(records):
        for i, row in enumerate(record["expert_load"]):
            matrix[i * experts:i * experts + len(row), t] = np.asarray(row, dtype=float) * len(row)
    edges = step_edges(np.array([r["step"] for r in records], dtype=float))
    if len(records) > max_columns:
        groups = np.array_split(np.arange(len(records)), max_columns)
        with np.errstate(all="ignore"):  # an all-NaN group (a layer missing throughout) stays NaN
            matrix = np.stack([np.nanmean(matrix[:, g], axis=1) for g in groups], axis=1)
        edges = np.array([edges[g[0]] for g in groups] + [edges[-1]])
    return edges, matrix, layers, experts


def draw_expert_load(fig: Figure, ax: Axes, run: Run) -> None:
    """The run's expert-load heatmap on `ax`, with its colour bar."""
    edges, matrix, layers, experts = load_matrix(run)
    top = float(np.nanmax(matrix)) if np.isfinite(matrix).any() else 2.0
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=max(2.0, top))
    mesh = ax.pcolormesh(edges, np.arange(layers * experts + 1), np.ma.masked_invalid(matrix), cmap="RdBu_r",
                         norm=norm, rasterized=True)
    ax.set_ylim(layers * experts, 0)  # layer 0 on top
    for i in range(1, layers):
        ax.axhline(i * experts, color="black", linewidth=0.8)
    ax.set_yticks([(i + 0.5) * experts for i in range(layers)], [f"MoE layer {i}" for i in range(layers)])
    if layers * experts <= 64:
        ax.set_yticks(np.arange(layers * experts) + 0.5, minor=True)
    ax.set_xlabel("step")
    ax.set_ylabel(f"expert ({experts} per layer)")
    ax.set_title(f"expert load: {run.name}")
    fig.colorbar(mesh, ax=ax, label="load / fair share (1 = balanced)")
