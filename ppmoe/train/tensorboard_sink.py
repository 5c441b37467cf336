"""TensorBoard as a metrics sink: every metrics.jsonl record also goes to event files in <run_dir>/tensorboard.

Tags (the metrics.jsonl field names, grouped so TensorBoard's dashboard shows one section per concern):

- a step record's `loss` -> `train/loss`, or `train/patch_loss` in the patch phase (a next-patch loss is
  not comparable with a token loss; metrics.jsonl separates them the same way for validation);
  `lr`, `grad_norm`, `loss_spike` (1) -> `train/<field>`
- `tokens_per_sec`, `tokens_seen`, `flops`, `mfu`, `memory_gib`, `elapsed_s` -> `perf/<field>`
- `aux_loss`, `z_loss`, `dropped_frac` -> `moe/<field>`; `expert_load[i][j]` ->
  `moe/expert_load/layer{i}/expert{j}` and, per layer, `moe/max_load/layer{i}`: the busiest expert's share
  over the fair share 1/E (1.0 = balanced, the console's "load max")
- `val_loss` -> `val/loss`, `val_patch_loss` -> `val/patch_loss` (any `val_<x>` -> `val/<x>`)
- any other number of a step record -> `train/<field>`
- a stage-boundary record (one with `event`): every number (bools as 0/1) -> `stage/<field>` (params_before,
  params_after, probe_loss_before, probe_loss_after, boundary_s, transform_s, exact), plus
  `stage/probe_loss_change` (after - before); its strings (event, from_stage, to_stage) as text `stage/<field>`
- a step record's strings (`stage`, `phase`) as text `train/<field>`, written only when they change
  (torch's add_text stores a text under `<tag>/text_summary`)

Every value is written at global_step = the record's step; a None (no MFU on CPU) is skipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

PERF_FIELDS = {"tokens_per_sec", "tokens_seen", "flops", "mfu", "memory_gib", "elapsed_s"}
MOE_FIELDS = {"aux_loss", "z_loss", "dropped_frac"}


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, complex)  # bool is an int: 0/1


def step_tag(field: str, record: dict[str, Any]) -> str:
    """The tag of one numeric field of a step record."""
    if field == "loss":
        return "train/patch_loss" if record.get("phase") == "patch" else "train/loss"
    if field in PERF_FIELDS:
        return f"perf/{field}"
    if field in MOE_FIELDS:
        return f"moe/{field}"
    if field.startswith("val_"):
        return f"val/{field[len('val_'):]}"
    return f"train/{field}"


def expert_load_scalars(load: list[list[float]]) -> list[tuple[str, float]]:
    """One scalar per layer and expert, and each layer's max-load ratio."""
    out = []
    for i, row in enumerate(load):
        out += [(f"moe/expert_load/layer{i}/expert{j}", float(share)) for j, share in enumerate(row)]
        if row:
            out.append((f"moe/max_load/layer{i}", max(row) * len(row)))
    return out


def tensorboard_items(record: dict[str, Any]) -> tuple[list[tuple[str, float]], list[tuple[str, str]]]:
    """A metrics record -> ([(tag, scalar)], [(tag, text)]), following the mapping in the module docstring."""
    scalars, texts = [], []
    boundary = "event" in record
    for field, value in record.items():
        if field == "step" or value is None:
            continue
        if boundary:
            if is_number(value):
                scalars.append((f"stage/{field}", float(value)))
            elif isinstance(value, str):
                texts.append((f"stage/{field}", value))
        elif field == "expert_load":
            scalars += expert_load_scalars(value)
        elif is_number(value):
            scalars.append((step_tag(field, record), float(value)))
        elif isinstance(value, str):
            texts.append((f"train/{field}", value))
        # other structures (none are logged today) have no scalar form: metrics.jsonl keeps them
    if boundary and is_number(record.get("probe_loss_before")) and is_number(record.get("probe_loss_after")):
        scalars.append(("stage/probe_loss_change", float(record["probe_loss_after"]) - record["probe_loss_before"]))
    return scalars, texts


class TensorBoardSink:
    """Writes each metrics record to TensorBoard event files under <run_dir>/tensorboard.

    A resumed run appends to the same directory, and its first record's step may already be there (the
    crashed run logged past the checkpoint). metrics.jsonl lets the later record win; TensorBoard does the
    same for events written after a SessionLog.START at step T (it hides every older event at step >= T),
    which SummaryWriter(purge_step=T) writes. So the writer is opened at the first record, with T = its
    step, and reopened whenever a step comes back (a rollback after non-finite steps). A boundary record
    is logged after the training record of its own step, and a run resumed from a boundary checkpoint logs
    it again without that training record: its T is the step after, so the training record survives (and
    the boundary's values are there twice at that step, the same numbers: a resume recomputes them)."""

    def __init__(self, run_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError("logging.tensorboard is true but tensorboard is not installed: pip install tensorboard "
                              "(or pip install 'ppmoe[tensorboard]')") from e
        self.make_writer = SummaryWriter
        self.log_dir = Path(run_dir) / "tensorboard"
        self.writer = None
        self.last_step: int | None = None
        self.last_text: dict[str, str] = {}

    def log(self, record: dict[str, Any]) -> None:
        step = int(record["step"])
        boundary = "event" in record
        purge_from = step + 1 if boundary else step
        if self.writer is None or (self.last_step is not None and purge_from <= self.last_step):
            self.close()
            self.writer = self.make_writer(log_dir=str(self.log_dir), purge_step=purge_from)
            self.last_text = {}  # the purge hid the texts at purge_from and after: write the current ones again
        self.last_step = step if self.last_step is None else max(self.last_step, step)
        scalars, texts = tensorboard_items(record)
        for tag, value in scalars:
            self.writer.add_scalar(tag, value, global_step=step)
        for tag, text in texts:
            if boundary or self.last_text.get(tag) != text:  # a stage name every logged step would be noise
                self.writer.add_text(tag, text, global_step=step)
                self.last_text[tag] = text

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None
