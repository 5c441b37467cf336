"""The tests' process launcher: ppmoe.launch.local (shared with the benchmarks)."""

from ppmoe.launch.local import free_port, run_ranks  # noqa: F401
