"""Reports on finished or running runs, read from their run directories: `plot_runs` draws one figure of
the losses (against steps, tokens and FLOPs), throughput, stage boundaries and expert load of one or
more runs. Nothing here imports torch: a report reads metrics.jsonl only."""

try:  # here, before any module of the package imports it: the one message whichever of them is imported
    import matplotlib  # noqa: F401
except ImportError as e:
    raise ImportError("ppmoe's plots need matplotlib: pip install matplotlib (or pip install -e '.[plot]')") from e

from .plot import build_figure, plot_runs  # noqa: E402
from .runs import Boundary, Run, boundaries, load_run  # noqa: E402

__all__ = ["Boundary", "Run", "boundaries", "build_figure", "load_run", "plot_runs"]
