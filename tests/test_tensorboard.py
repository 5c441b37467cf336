"""The TensorBoard sink: every metrics.jsonl record is in the event files under <run_dir>/tensorboard, read
back with TensorBoard's own EventAccumulator at the same steps and values; a resumed run's later records
win there as they do in metrics.jsonl; a missing package is a clear error; a real tiny run writes its loss."""

import json
import sys

import numpy as np
import pytest

pytest.importorskip("tensorboard")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.util import tensor_util  # noqa: E402

from multiproc import run_ranks  # noqa: E402
from ppmoe.config import load_config  # noqa: E402
from ppmoe.train.metrics import MetricsLogger, read_metrics  # noqa: E402
from ppmoe.train.tensorboard_sink import tensorboard_items  # noqa: E402
from test_parallel_equivalence import tiny_config  # noqa: E402

LOAD = [[0.5, 0.5], [0.75, 0.25]]
BASE = {"lr": 1e-3, "grad_norm": 0.5, "tokens_per_sec": 1000.0, "mfu": None, "memory_gib": 1.5, "elapsed_s": 2.0}
RECORDS = [
    {"step": 1, "stage": "patch", "phase": "patch", "loss": 7.0, "tokens_seen": 64, "flops": 1e9, **BASE},
    {"step": 2, "stage": "patch", "phase": "patch", "loss": 6.5, "tokens_seen": 128, "flops": 2e9, **BASE,
     "val_patch_loss": 6.6},
    {"step": 2, "event": "growth", "from_stage": "patch", "to_stage": "moe", "params_before": 1000,
     "params_after": 4000, "probe_loss_before": 6.0, "probe_loss_after": 6.25, "boundary_s": 0.5, "exact": False,
     "transform_s": 0.1},
    {"step": 3, "stage": "moe", "phase": "token", "loss": 5.0, "tokens_seen": 144, "flops": 4e9, **BASE,
     "aux_loss": 0.01, "z_loss": 0.002, "dropped_frac": 0.0, "expert_load": LOAD, "loss_spike": True},
    {"step": 4, "val_loss": 4.9},
]


def events(run_dir) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalars(acc, repeats_allowed=()) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of every scalar in the event files, each step once (what TensorBoard shows)."""
    out = {}
    for tag in acc.Tags()["scalars"]:
        steps = [e.step for e in acc.Scalars(tag)]
        if not tag.startswith(repeats_allowed):  # a step twice: a resume's records did not replace the old ones
            assert len(steps) == len(set(steps)), (tag, steps)
        out[tag] = {e.step: e.value for e in acc.Scalars(tag)}
    return out


def texts(acc) -> dict[str, dict[int, str]]:
    """{tag: {step: text}}, the tag without the "/text_summary" torch's add_text appends."""
    return {tag.removesuffix("/text_summary"): {e.step: tensor_util.make_ndarray(e.tensor_proto).item().decode()
                                               for e in acc.Tensors(tag)} for tag in acc.Tags()["tensors"]}


def log_all(run_dir, records):
    logger = MetricsLogger(load_config(None, ["logging.tensorboard=true"]), run_dir, is_main=True)
    for record in records:
        logger.log(record)
    logger.close()


def test_tag_mapping():
    found, text = tensorboard_items(RECORDS[3])
    found = dict(found)
    assert found["train/loss"] == 5.0 and found["train/lr"] == 1e-3 and found["train/loss_spike"] == 1.0
    assert found["perf/tokens_per_sec"] == 1000.0 and found["perf/flops"] == 4e9 and "perf/mfu" not in found
    assert found["moe/aux_loss"] == 0.01 and found["moe/expert_load/layer1/expert0"] == 0.75
    assert found["moe/max_load/layer0"] == 1.0 and found["moe/max_load/layer1"] == 1.5
    assert dict(text) == {"train/stage": "moe", "train/phase": "token"}
    assert dict(tensorboard_items(RECORDS[0])[0])["train/patch_loss"] == 7.0  # not comparable with train/loss
    assert tensorboard_items(RECORDS[4]) == ([("val/loss", 4.9)], [])
    boundary, text = tensorboard_items(RECORDS[2])
    assert dict(boundary) == {"stage/params_before": 1000, "stage/params_after": 4000, "stage/probe_loss_before": 6.0,
                              "stage/probe_loss_after": 6.25, "stage/boundary_s": 0.5, "stage/exact": 0.0,
                              "stage/transform_s": 0.1, "stage/probe_loss_change": 0.25}
    assert dict(text) == {"stage/event": "growth", "stage/from_stage": "patch", "stage/to_stage": "moe"}


def test_event_files_hold_what_metrics_jsonl_holds(tmp_path):
    log_all(tmp_path, RECORDS)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == RECORDS
    expected: dict[str, dict[int, float]] = {}
    for record in lines:
        for tag, value in tensorboard_items(record)[0]:
            expected.setdefault(tag, {})[record["step"]] = value
    found = scalars(events(tmp_path))
    assert set(found) == set(expected)
    for tag, by_step in expected.items():  # TensorBoard keeps float32
        assert found[tag] == pytest.approx({s: np.float32(v) for s, v in by_step.items()}, rel=1e-7), tag
    assert found["train/loss"] == {3: 5.0} and found["train/patch_loss"] == {1: 7.0, 2: 6.5}
    assert found["val/patch_loss"] == {2: pytest.approx(6.6)} and found["val/loss"] == {4: pytest.approx(4.9)}
    assert found["moe/max_load/layer1"] == {3: 1.5} and found["stage/params_after"] == {2: 4000.0}
    text = texts(events(tmp_path))
    assert text["train/stage"] == {1: "patch", 3: "moe"}  # written when it changes
    assert text["stage/to_stage"] == {2: "moe"} and text["stage/event"] == {2: "growth"}


def loss_record(step, loss):
    return {"step": step, "stage": "s", "phase": "token", "loss": loss, **BASE}


def test_resumed_run_later_records_win(tmp_path):
    """As in metrics.jsonl: a resumed run re-logs steps past its checkpoint; TensorBoard shows the new ones."""
    log_all(tmp_path, [loss_record(s, 10.0 + s) for s in (1, 2, 3, 4)])
    log_all(tmp_path, [loss_record(s, 20.0 + s) for s in (3, 4, 5)])
    assert scalars(events(tmp_path))["train/loss"] == {1: 11.0, 2: 12.0, 3: 23.0, 4: 24.0, 5: 25.0}
    assert {s: m["loss"] for s, m in read_metrics(tmp_path / "metrics.jsonl").items()} == \
        {1: 11.0, 2: 12.0, 3: 23.0, 4: 24.0, 5: 25.0}


def test_resume_at_a_boundary_keeps_that_steps_training_record(tmp_path):
    boundary = {"step": 2, "event": "stage", "from_stage": "a", "to_stage": "b", "params_before": 1, "params_after": 1,
                "probe_loss_before": 3.0, "probe_loss_after": 3.0, "boundary_s": 0.1}
    log_all(tmp_path, [loss_record(1, 11.0), loss_record(2, 12.0), boundary, loss_record(3, 13.0)])
    log_all(tmp_path, [boundary, loss_record(3, 23.0)])  # resumed from the boundary checkpoint at step 2
    found = scalars(events(tmp_path), repeats_allowed=("stage/",))
    assert found["train/loss"] == {1: 11.0, 2: 12.0, 3: 23.0}
    # The boundary itself is there twice at step 2 (the known cost of keeping step 2's training record),
    # with the same values: a resumed boundary recomputes what the first one logged.
    assert [e.step for e in events(tmp_path).Scalars("stage/probe_loss_after")] == [2, 2]


def test_rollback_in_one_process_later_records_win(tmp_path):
    log_all(tmp_path, [loss_record(s, 10.0 + s) for s in (1, 2, 3)] + [loss_record(2, 22.0), loss_record(3, 23.0)])
    assert scalars(events(tmp_path))["train/loss"] == {1: 11.0, 2: 22.0, 3: 23.0}


def test_non_main_ranks_write_no_events(tmp_path):
    MetricsLogger(load_config(None, ["logging.tensorboard=true"]), tmp_path, is_main=False).log(RECORDS[0])
    assert not (tmp_path / "tensorboard").exists()


def test_tensorboard_missing_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # the import fails
    with pytest.raises(ImportError, match="pip install tensorboard"):
        MetricsLogger(load_config(None, ["logging.tensorboard=true"]), tmp_path, is_main=True)


def train(dataset_dir, output_dir, overrides):
    from ppmoe.train import Trainer

    return Trainer(tiny_config(dataset_dir, output_dir, overrides)).fit().last_step


def test_training_run_writes_its_loss_to_tensorboard(tiny_dataset, tmp_path):
    overrides = ["train.steps=4", "train.log_every=2", "train.val_every=4", "logging.tensorboard=true",
                 "moe.num_experts=2", "moe.top_k=1"]
    assert run_ranks(train, 1, tiny_dataset, str(tmp_path), overrides) == [4]
    metrics = read_metrics(tmp_path / "metrics.jsonl")
    found = scalars(events(tmp_path))
    assert sorted(found["train/loss"]) == sorted(metrics) == [2, 4]
    for step, record in metrics.items():
        assert found["train/loss"][step] == pytest.approx(record["loss"], rel=1e-6)
        assert found["perf/tokens_seen"][step] == record["tokens_seen"]
        assert found["moe/expert_load/layer0/expert1"][step] == pytest.approx(record["expert_load"][0][1], rel=1e-6)
    assert found["val/loss"] == {4: pytest.approx(metrics[4]["val_loss"], rel=1e-6)}
