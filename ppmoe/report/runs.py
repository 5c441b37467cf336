"""A run's metrics.jsonl as what a plot needs: its step records, its stage boundaries, and series of them.

metrics.jsonl is read with read_metrics' rule (ppmoe.train.metrics): the records of one step are merged,
later ones overriding earlier ones, so a step logged again after a resume shows the resumed run's values.
It is read here rather than through read_metrics because importing ppmoe.train pulls in torch (~2.5 s
on a CPU machine) and a plot needs none of it; the tests check both readers agree. Boundary records
(those with "event") are kept apart from the training record of the same step instead of merged into it.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError

METRICS_FILE = "metrics.jsonl"


@dataclass(frozen=True)
class Boundary:
    """A stage or phase boundary: the last step of the old stage and what changed."""
    step: int
    label: str


@dataclass
class Run:
    """One run directory's records."""
    name: str
    path: Path
    records: list[dict[str, Any]]  # step records (training and/or validation), one per step, by step
    events: list[dict[str, Any]] = field(default_factory=list)  # boundary records, by step

    def with_field(self, name: str) -> list[dict[str, Any]]:
        """The step records that have a (non-null) value for `name`."""
        return [r for r in self.records if r.get(name) is not None]

    def x_at(self, axis: str, steps) -> np.ndarray | None:
        """The `axis` field ("step", "tokens_seen", "flops") at `steps`, interpolated between the logged
        records that have it (validation-only records and boundaries carry no tokens or FLOPs); None when
        no record has it (an older run)."""
        steps = np.asarray(steps, dtype=float)
        if axis == "step":
            return steps
        known = self.with_field(axis)
        if not known:
            return None
        return np.interp(steps, [r["step"] for r in known], [float(r[axis]) for r in known])

    @property
    def has_moe(self) -> bool:
        return any(r.get("expert_load") for r in self.records)


def read_lines(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl in file order. A line that is not a JSON object with a step is skipped
    with a warning: a run killed while writing leaves a cut line, which a resumed run then appends to."""
    records, damaged = [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        else:
            damaged.append(number)
    if damaged and records:
        warnings.warn(f"{path}: skipped {len(damaged)} damaged line(s) (line {', '.join(map(str, damaged[:5]))}"
                      f"{', ...' if len(damaged) > 5 else ''}): a run killed while writing cuts its last line")
    if not records:
        what = "has no readable record" if damaged else "is empty"
        raise DataError(f"{path} {what}: the run has not logged a step yet (it logs every train.log_every steps); "
                        f"plot it once it has, or leave this run directory out")
    return records


def load_run(run_dir: str | Path, name: str | None = None) -> Run:
    """Read `run_dir`/metrics.jsonl into a Run named `name` (default: the directory's name)."""
    run_dir = Path(run_dir)
    path = run_dir / METRICS_FILE
    if not run_dir.is_dir():
        raise DataError(f"{run_dir}: no such run directory: give the output_dir of a ppmoe run")
    if not path.is_file():
        raise DataError(f"{run_dir} has no {METRICS_FILE}: give the output_dir of a ppmoe run (the directory with "
                        f"config.yaml and checkpoints/) that has logged at least one step")
    steps: dict[int, dict[str, Any]] = {}
    events: dict[tuple, dict[str, Any]] = {}
    for record in read_lines(path):
        if "event" in record:  # a boundary logged again after a resume replaces the first one
            events[(record["step"], record.get("from_stage"), record.get("to_stage"))] = record
        else:
            steps.setdefault(record["step"], {}).update(record)
    return Run(name=name or run_dir.resolve().name, path=run_dir, records=[steps[s] for s in sorted(steps)],
               events=sorted(events.values(), key=lambda r: r["step"]))


def boundary_label(event: dict[str, Any]) -> str:
    label = f"{event.get('from_stage', '?')} → {event.get('to_stage', '?')}"
    return label + " (growth)" if event.get("event") == "growth" else label


def boundaries(run: Run) -> list[Boundary]:
    """The run's stage boundaries: its boundary records, and any change of stage (or of phase) between two
    consecutive training records that no boundary record covers (runs logged before boundary records were)."""
    found = [Boundary(e["step"], boundary_label(e)) for e in run.events]
    covered = [e["step"] for e in run.events]
    training = [r for r in run.records if "stage" in r or "phase" in r]
    for before, after in zip(training, training[1:]):
        if any(before["step"] <= s <= after["step"] for s in covered):
            continue
        if before.get("stage") != after.get("stage"):
            found.append(Boundary(before["step"], f"{before.get('stage')} → {after.get('stage')}"))
        elif before.get("phase") != after.get("phase"):
            found.append(Boundary(before["step"], f"{before.get('phase')} → {after.get('phase')} phase"))
    return sorted(found, key=lambda b: b.step)


def phase_segments(records: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """Consecutive records split where the phase changes: [(phase, records)], so a line drawn per segment
    never joins a patch-phase point to a token-phase one. A record without a phase counts as token."""
    segments: list[tuple[str, list[dict[str, Any]]]] = []
    for record in records:
        phase = record.get("phase") or "token"
        if segments and segments[-1][0] == phase:
            segments[-1][1].append(record)
        else:
            segments.append((phase, [record]))
    return segments
