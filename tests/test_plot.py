"""`ppmoe plot`: runs' metrics.jsonl -> one figure (losses against steps, tokens and FLOPs, throughput,
stage boundaries, expert-load heatmaps). Synthetic runs: a dense one and an MoE growth run with a patch
stage, a growth and a resumed (re-logged) step."""

import json

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from ppmoe.errors import DataError, PpmoeError  # noqa: E402
from ppmoe.report import Boundary, boundaries, build_figure, load_run, plot_runs  # noqa: E402
from ppmoe.report.expert_load import load_matrix  # noqa: E402
from ppmoe.report.plot import BOUNDARY_GID  # noqa: E402
from ppmoe.train.metrics import read_metrics  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir, records):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


def step_record(step, stage, phase, loss, tokens_per_step=1000, **extra):
    return {"step": step, "stage": stage, "phase": phase, "loss": loss, "lr": 1e-3, "grad_norm": 0.5,
            "tokens_per_sec": 5000.0 if phase == "token" else 20000.0, "tokens_seen": step * tokens_per_step,
            "flops": step * 1e9, "mfu": None, "memory_gib": 0.5, "elapsed_s": step / 10, **extra}


def dense_records():
    return [step_record(s, "dense", "token", 6.0 - s / 100, **({"val_loss": 6.1 - s / 100} if s % 50 == 0 else {}))
            for s in range(10, 130, 10)]


def load(step, experts=4):
    shares = np.arange(1, experts + 1, dtype=float) + step % 3
    return [list(np.round(shares / shares.sum(), 4)), [1 / experts] * experts]


def growth_records():
    records = [step_record(s, "patch", "patch", 7.0 - s / 100, tokens_per_step=4000,
                           **({"val_patch_loss": 6.9} if s == 20 else {})) for s in (10, 20, 30, 40)]
    records.append({"step": 40, "event": "stage", "from_stage": "patch", "to_stage": "small", "params_before": 10,
                    "params_after": 10, "probe_loss_before": 6.5, "probe_loss_after": 6.5, "boundary_s": 0.1})
    records += [step_record(s, "small", "token", 6.0 - s / 100, **({"val_loss": 5.5} if s == 60 else {}))
                for s in (50, 60, 70, 80)]
    records.append({"step": 80, "event": "growth", "from_stage": "small", "to_stage": "moe", "params_before": 10,
                    "params_after": 40, "probe_loss_before": 5.2, "probe_loss_after": 5.4, "boundary_s": 0.3,
                    "exact": False, "transform_s": 0.1})
    moe = {"aux_loss": 0.01, "z_loss": 0.001, "dropped_frac": 0.0}
    records += [step_record(s, "moe", "token", 5.0 - s / 1000, expert_load=load(s), **moe) for s in (90, 100, 110)]
    # killed after step 110, resumed from a checkpoint at step 100: steps 110 and 120 are logged again
    records += [step_record(s, "moe", "token", 4.5, expert_load=load(s), **moe) for s in (110, 120)]
    records.append({"step": 120, "val_loss": 4.6})
    return records


@pytest.fixture
def runs(tmp_path):
    return write_run(tmp_path / "dense", dense_records()), write_run(tmp_path / "moe_growth", growth_records())


def test_run_records_follow_read_metrics(runs):
    """The report's reader and read_metrics agree on every step (later records win); boundaries stay apart."""
    for run_dir in runs:
        run = load_run(run_dir)
        strip = {"event", "from_stage", "to_stage", "params_before", "params_after", "probe_loss_before",
                 "probe_loss_after", "boundary_s", "exact", "transform_s"}
        merged = read_metrics(run_dir / "metrics.jsonl")  # boundary fields merged into their step's record
        expected = {s: {k: v for k, v in r.items() if k not in strip} for s, r in merged.items()}
        assert {r["step"]: r for r in run.records} == expected
    growth = load_run(runs[1])
    by_step = {r["step"]: r for r in growth.records}
    resumed = step_record(120, "moe", "token", 4.5, expert_load=load(120), aux_loss=0.01, z_loss=0.001,
                          dropped_frac=0.0)
    assert by_step[110]["loss"] == 4.5 and by_step[120] == {**resumed, "val_loss": 4.6}
    assert [e["event"] for e in growth.events] == ["stage", "growth"] and growth.name == "moe_growth"


def test_boundaries_from_events_and_from_stage_changes(runs, tmp_path):
    assert boundaries(load_run(runs[1])) == [Boundary(40, "patch → small"), Boundary(80, "small → moe (growth)")]
    assert boundaries(load_run(runs[0])) == []
    # a run without boundary records (older logs): the changes of stage, or of phase, between two records
    old = [r for r in growth_records() if "event" not in r]
    old = [{**r, "stage": "one"} if r.get("stage") in ("patch", "small") else r for r in old]
    assert boundaries(load_run(write_run(tmp_path / "old", old))) == [
        Boundary(40, "patch → token phase"), Boundary(80, "one → moe")]


def test_plot_runs_writes_a_png(runs, tmp_path):
    out = tmp_path / "runs.png"
    assert plot_runs(list(runs), out) == out
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 20_000


def loss_axes(fig):
    return [ax for ax in fig.axes if ax.get_title().startswith("loss vs")]


def test_figure_panels_lines_and_boundaries(runs):
    dense, growth = load_run(runs[0]), load_run(runs[1])
    fig = build_figure([dense, growth])
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[:5] == ["loss vs step", "loss vs tokens seen", "loss vs FLOPs", "throughput",
                          "expert load: moe_growth"]
    assert len(fig.axes) == 6  # and the heatmap's colour bar
    for ax in loss_axes(fig):
        assert ax.get_legend_handles_labels()[1] == ["dense", "moe_growth"]  # one labelled line per run
        data = [line for line in ax.lines if line.get_gid() != BOUNDARY_GID]
        # dense: train, val; growth: patch train (dashed), token train, val_loss, val_patch_loss (dashed)
        assert len(data) == 6
        assert sorted(line.get_linestyle() for line in data if line.get_color() == "C1") == ["-", "-", "--", "--"]
    step_ax, tokens_ax, flops_ax = loss_axes(fig)
    patch_line = next(line for line in step_ax.lines if line.get_linestyle() == "--" and line.get_marker() == "None")
    assert list(patch_line.get_xdata()) == [10, 20, 30, 40] and patch_line.get_label() == "_nolegend_"
    assert flops_ax.get_xscale() == "log"

    def boundary_xs(ax):
        return [line.get_xdata()[0] for line in ax.lines if line.get_gid() == BOUNDARY_GID]

    assert boundary_xs(step_ax) == [40, 80] and boundary_xs(fig.axes[3]) == [40, 80]  # throughput: steps
    assert boundary_xs(tokens_ax) == [40 * 4000, 80 * 1000]  # the tokens seen at those steps
    assert boundary_xs(flops_ax) == [40e9, 80e9]
    assert [t.get_text() for t in step_ax.texts] == ["patch → small", "small → moe (growth)"]


def test_validation_points_sit_at_their_steps(runs):
    fig = build_figure([load_run(runs[1])])
    step_ax, tokens_ax, _ = loss_axes(fig)
    val = [line for line in step_ax.lines if line.get_marker() == "o" and line.get_linestyle() == "-"]
    assert [list(line.get_xdata()) for line in val] == [[60, 120]]
    assert list(val[0].get_ydata()) == [5.5, 4.6]
    # a validation-only record carries no tokens: its x is interpolated from the records around it
    val = [line for line in tokens_ax.lines if line.get_marker() == "o" and line.get_linestyle() == "-"]
    assert list(val[0].get_xdata()) == [60_000, 120_000]


def test_labels_name_the_runs(runs, tmp_path):
    out = plot_runs(list(runs), tmp_path / "a.png", labels=["baseline", "grown"])
    assert out.read_bytes().startswith(PNG_MAGIC)
    fig = build_figure([load_run(runs[0], "baseline"), load_run(runs[1], "grown")])
    assert all(ax.get_legend_handles_labels()[1] == ["baseline", "grown"] for ax in loss_axes(fig))


def test_dense_runs_have_no_heatmap(runs):
    fig = build_figure([load_run(runs[0])])
    assert [ax.get_title() for ax in fig.axes] == ["loss vs step", "loss vs tokens seen", "loss vs FLOPs", "throughput"]


def test_many_moe_runs_wrap_three_panels_a_row(runs, tmp_path):
    moe_runs = [load_run(runs[1], f"moe{i}") for i in range(3)]
    fig = build_figure(moe_runs)
    assert sum(ax.get_title().startswith("expert load") for ax in fig.axes) == 3
    assert fig.axes[0].get_gridspec().nrows == 3


def test_expert_load_matrix(runs):
    edges, matrix, layers, experts = load_matrix(load_run(runs[1]))
    assert (layers, experts) == (2, 4) and matrix.shape == (8, 4)
    assert list(edges) == [85, 95, 105, 115, 125]  # halfway between the logged steps 90 .. 120
    assert matrix[0, 0] == pytest.approx(load(90)[0][0] * 4) and np.allclose(matrix[4:], 1.0)
    edges, binned, _, _ = load_matrix(load_run(runs[1]), max_columns=2)
    assert list(edges) == [85, 105, 125] and np.allclose(binned[:, 0], matrix[:, :2].mean(axis=1))


def test_errors_say_what_to_do(runs, tmp_path):
    with pytest.raises(DataError, match="no metrics.jsonl: give the output_dir of a ppmoe run"):
        plot_runs([tmp_path], tmp_path / "x.png")
    with pytest.raises(DataError, match="no such run directory"):
        plot_runs([tmp_path / "nowhere"], tmp_path / "x.png")
    empty = write_run(tmp_path / "empty", [])
    with pytest.raises(DataError, match=r"metrics.jsonl is empty: the run has not logged a step yet"):
        plot_runs([runs[0], empty], tmp_path / "x.png")
    (empty / "metrics.jsonl").write_text('{"step": 1, "lo')
    with pytest.raises(DataError, match="has no readable record"):
        plot_runs([empty], tmp_path / "x.png")
    with pytest.raises(PpmoeError, match=r"the directory .*missing does not exist: create it"):
        plot_runs([runs[0]], tmp_path / "missing" / "x.png")
    with pytest.raises(PpmoeError, match=r"ending in one of .*\.png"):
        plot_runs([runs[0]], tmp_path / "x.nothing")
    with pytest.raises(PpmoeError, match="1 label.* for 2 run directories"):
        plot_runs(list(runs), tmp_path / "x.png", labels=["one"])
    with pytest.raises(PpmoeError, match="at least one run directory"):
        plot_runs([], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_a_cut_line_is_skipped_with_a_warning(tmp_path):
    """A run killed mid-write leaves a cut line; its resumed run appends the next record to it."""
    run_dir = write_run(tmp_path / "cut", dense_records()[:3])
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 40, "lo' + json.dumps(dense_records()[3]) + "\n")
    with pytest.warns(UserWarning, match="skipped 1 damaged line"):
        run = load_run(run_dir)
    assert [r["step"] for r in run.records] == [10, 20, 30]


def test_runs_without_tokens_or_flops_still_plot_against_steps(tmp_path):
    """metrics.jsonl of an older ppmoe has no tokens_seen or flops: those panels say so, the rest is drawn."""
    old = [{k: v for k, v in r.items() if k not in ("tokens_seen", "flops")} for r in growth_records()]
    fig = build_figure([load_run(write_run(tmp_path / "old", old))])
    step_ax, tokens_ax, flops_ax = loss_axes(fig)
    assert len(step_ax.lines) > 0 and not tokens_ax.lines and not flops_ax.lines
    assert [t.get_text() for t in tokens_ax.texts] == ["no run logged tokens_seen"]
    assert [t.get_text() for t in flops_ax.texts] == ["no run logged flops"]
