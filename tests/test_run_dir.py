"""The run directory: one run at a time (a lock, stale locks replaced), no fresh start over another run's
checkpoints, no resume with a config that no longer describes the checkpoints, and config.yaml written
only once those checks passed."""

import multiprocessing as mp
import os
import signal
import time

import pytest
import yaml

from multiproc import run_ranks
from ppmoe.train.checkpoint import complete_checkpoints
from ppmoe.train.run_dir import LOCK_FILE, resume_changes
from test_parallel_equivalence import tiny_config


def start(dataset_dir, output_dir, overrides=()):
    """Build a Trainer (taking the lock) and report the RunDirError message, if any."""
    from ppmoe.errors import RunDirError
    from ppmoe.train import Trainer

    try:
        Trainer(tiny_config(dataset_dir, output_dir, list(overrides)))
    except RunDirError as e:
        return str(e)
    return None


def train(dataset_dir, output_dir, overrides=()):
    from ppmoe.train import Trainer

    Trainer(tiny_config(dataset_dir, output_dir, ["train.steps=2", "checkpoint.save_final=true", *overrides])).fit()


def hold_lock(dataset_dir, output_dir, ready):
    """A run that takes the lock and then sits there (as a long step would)."""
    from ppmoe.train import Trainer

    Trainer(tiny_config(dataset_dir, output_dir, []))
    ready.set()
    time.sleep(300)


def test_a_second_run_in_the_same_directory_is_refused_and_a_stale_lock_replaced(tiny_dataset, tmp_path):
    ctx = mp.get_context("fork")
    ready = ctx.Event()
    holder = ctx.Process(target=hold_lock, args=(tiny_dataset, str(tmp_path), ready))
    holder.start()
    try:
        assert ready.wait(120)
        message = run_ranks(start, 1, tiny_dataset, str(tmp_path))[0]
        assert message and "in use by another run" in message and f"pid {holder.pid}" in message
        assert str(tmp_path / LOCK_FILE) in message  # how to clear it if that run is really gone
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # dies holding the lock
        holder.join()
    assert (tmp_path / LOCK_FILE).exists()
    assert run_ranks(start, 1, tiny_dataset, str(tmp_path))[0] is None  # its process is gone: stale, replaced


def test_resume_none_over_checkpoints_is_refused(tiny_dataset, tmp_path):
    run_ranks(train, 1, tiny_dataset, str(tmp_path))
    assert not (tmp_path / LOCK_FILE).exists()  # a finished run releases the lock
    recorded = (tmp_path / "config.yaml").read_text()
    message = run_ranks(start, 1, tiny_dataset, str(tmp_path), ["train.resume=none", "train.lr=0.5"])[0]
    assert message and "step_00000002" in message and "train.resume=auto" in message and "another output_dir" in message
    assert (tmp_path / "config.yaml").read_text() == recorded  # the record of what the checkpoints hold is kept
    assert [p.name for p in complete_checkpoints(tmp_path / "checkpoints")] == ["step_00000002"]


def test_resume_with_another_shape_names_the_keys(tiny_dataset, tmp_path):
    run_ranks(train, 1, tiny_dataset, str(tmp_path))
    recorded = (tmp_path / "config.yaml").read_text()
    message = run_ranks(start, 1, tiny_dataset, str(tmp_path),
                        ["model.d_model=64", "train.global_batch_size=16", "train.lr=0.5", "parallel.dp=1"])[0]
    assert message and "model.d_model: 32 -> 64" in message and "train.global_batch_size: 8 -> 16" in message
    assert "train.lr" not in message  # the learning rate may change on resume, and so may the layout
    assert (tmp_path / "config.yaml").read_text() == recorded
    # a resume that keeps the shape is accepted, and only then is the config recorded again
    assert run_ranks(start, 1, tiny_dataset, str(tmp_path), ["train.lr=0.5"])[0] is None
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["lr"] == 0.5


def test_resume_changes_compare_stage_plans_too():
    from ppmoe.config import load_config, to_dict

    before = load_config(None, ["growth.stages.0.name=a", "growth.stages.0.share=0.5",
                                "growth.stages.0.model={d_model: 32, n_heads: 2}",
                                "growth.stages.1.name=b", "growth.stages.1.share=0.5"])
    after = load_config(None, ["growth.stages.0.name=a", "growth.stages.0.share=0.4",
                               "growth.stages.0.model={d_model: 32, n_heads: 2}",
                               "growth.stages.1.name=b", "growth.stages.1.share=0.6", "train.steps=500"])
    changes = resume_changes(to_dict(before), after)
    assert changes == ["growth.stages.0.share: 0.5 -> 0.4", "growth.stages.1.share: 0.5 -> 0.6"]


@pytest.mark.parametrize("key", ["train.resume=auto", "train.resume=none"])
def test_a_fresh_directory_is_recorded(key, tiny_dataset, tmp_path):
    assert run_ranks(start, 1, tiny_dataset, str(tmp_path / "new"), [key])[0] is None
    assert (tmp_path / "new" / "config.yaml").is_file()
