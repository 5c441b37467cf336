"""The tests' process launcher: ppmoe.launch.local (shared with the benchmarks)."""

from ppmoe.launch.local import free_port, run_ranks, run_ranks_expecting_death  # noqa: F401
