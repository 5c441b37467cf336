"""Non-finite steps never reach the optimizer or a checkpoint (train.nonfinite: skip, stop, rollback; agreed
across ranks), loss spikes are reported, and a non-finite state is never saved."""

import math

import pytest
import torch

from multiproc import run_ranks
from ppmoe.train.checkpoint import complete_checkpoints
from ppmoe.train.health import LossSpikeMonitor, NonFiniteGuard
from ppmoe.train.metrics import read_metrics
from test_growth_run import read_checkpoint
from test_parallel_equivalence import tiny_config

STEPS = 8


def poison_batches(trainer, bad_calls: set[int], ranks: set[int] | None = None) -> None:
    """Make the gradients of the `bad_calls`-th training batches (1-based, counting every batch the run reads,
    so a batch skipped by a rollback is not met again) NaN, on `ranks` only (all when None): a bad batch."""
    import torch.distributed as dist

    runner = trainer.current.runner
    original, calls = runner.train_step, [0]

    def train_step(inputs, targets):
        loss = original(inputs, targets)
        calls[0] += 1
        if calls[0] in bad_calls and (ranks is None or dist.get_rank() in ranks):
            for p in trainer.model.parameters():
                if p.grad is not None:
                    p.grad.fill_(float("nan"))
        return loss

    runner.train_step = train_step


def train(dataset_dir, output_dir, overrides, bad_calls=(), ranks=None):
    """Run with poisoned batches; returns (error text or None, {name: full parameter})."""
    from torch.distributed.tensor import DTensor

    from ppmoe.errors import NonFiniteError
    from ppmoe.train import Trainer

    trainer = Trainer(tiny_config(dataset_dir, output_dir, [f"train.steps={STEPS}", *overrides]))
    poison_batches(trainer, set(bad_calls), ranks)
    try:
        trainer.fit()
        error = None
    except NonFiniteError as e:
        error = str(e)
    params = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
              for n, p in trainer.model.named_parameters()}
    return error, params


def model_tensors(checkpoint):
    return {k: v for k, v in read_checkpoint(checkpoint).items() if k.startswith("model.")}


def adam_steps(checkpoint) -> set[float]:
    """The optimizer's step counts in a checkpoint: one per update it really applied."""
    return {float(t) for k, t in read_checkpoint(checkpoint).items() if k.startswith("optim.state.") and k.endswith(".step")}


def test_skip_drops_the_update_and_moves_on(tiny_dataset, tmp_path):
    error, params = run_ranks(train, 1, tiny_dataset, str(tmp_path), ["checkpoint.every=1", "checkpoint.keep=0"],
                              {3})[0]
    assert error is None and all(torch.isfinite(p).all() for p in params.values())
    saved = {int(p.name[5:]): p for p in complete_checkpoints(tmp_path / "checkpoints")}
    assert sorted(saved) == [1, 2, 4, 5, 6, 7, 8]  # none inside the bad step
    assert adam_steps(saved[2]) == {2.0} and adam_steps(saved[4]) == {3.0}  # step 3's update never happened
    metrics = read_metrics(tmp_path / "metrics.jsonl")
    assert math.isnan(metrics[3]["grad_norm"]) and math.isfinite(metrics[4]["loss"])


def test_skip_stops_after_too_many_in_a_row(tiny_dataset, tmp_path):
    error, _ = run_ranks(train, 1, tiny_dataset, str(tmp_path), ["train.nonfinite_max=3", "checkpoint.every=2"],
                         {3, 4, 5})[0]
    assert error and "step 5" in error and "3 steps in a row" in error and "step_00000002" in error
    # step 4 fell inside the run of bad steps: no periodic checkpoint there
    assert [p.name for p in complete_checkpoints(tmp_path / "checkpoints")] == ["step_00000002"]
    for checkpoint in complete_checkpoints(tmp_path / "checkpoints"):  # nothing non-finite was saved
        assert all(torch.isfinite(t).all() for t in read_checkpoint(checkpoint).values() if t.is_floating_point())


def test_stop_stops_at_the_first(tiny_dataset, tmp_path):
    error, _ = run_ranks(train, 1, tiny_dataset, str(tmp_path), ["train.nonfinite=stop", "checkpoint.every=2"],
                         {3})[0]
    assert error and "step 3" in error and "train.nonfinite=stop" in error and "step_00000002" in error
    assert [p.name for p in complete_checkpoints(tmp_path / "checkpoints")] == ["step_00000002"]


def test_rollback_reloads_and_continues_after_the_bad_batches(tiny_dataset, tmp_path):
    """Batches 5 and 6 are bad: after the second, the run reloads step 4 and goes on with batch 7 at step 5."""
    reference = tmp_path / "reference"
    run_ranks(train, 1, tiny_dataset, str(reference), ["checkpoint.every=2"])
    error, params = run_ranks(train, 1, tiny_dataset, str(tmp_path / "run"),
                              ["train.nonfinite=rollback", "train.nonfinite_max=2", "checkpoint.every=2"], {5, 6})[0]
    assert error is None and all(torch.isfinite(p).all() for p in params.values())
    metrics, straight = read_metrics(tmp_path / "run" / "metrics.jsonl"), read_metrics(reference / "metrics.jsonl")
    assert [metrics[s]["loss"] for s in (1, 2, 3, 4)] == [straight[s]["loss"] for s in (1, 2, 3, 4)]
    assert metrics[5]["loss"] != straight[5]["loss"] and math.isfinite(metrics[STEPS]["loss"])
    assert "step_00000008" in [p.name for p in complete_checkpoints(tmp_path / "run" / "checkpoints")]


def test_rollback_gives_up_after_too_many(tiny_dataset, tmp_path):
    error, _ = run_ranks(train, 1, tiny_dataset, str(tmp_path),
                         ["train.nonfinite=rollback", "train.nonfinite_max=2", "checkpoint.every=2"], set(range(5, 40)))[0]
    assert error and "after 2 rollbacks" in error


def test_ranks_agree_when_one_rank_goes_non_finite(tiny_dataset, tmp_path):
    """TP=2, only rank 1's gradients are NaN: both ranks drop the update (no hang, no divergence: a rank that
    applied it would hold NaN weights, which the save refuses)."""
    (error, params), _ = run_ranks(train, 2, tiny_dataset, str(tmp_path), ["parallel.tp=2", "checkpoint.every=1",
                                                                            "checkpoint.keep=0"], {3}, {1})
    assert error is None and all(torch.isfinite(p).all() for p in params.values())
    saved = {int(p.name[5:]): p for p in complete_checkpoints(tmp_path / "checkpoints")}
    assert adam_steps(saved[4]) == {3.0}


def corrupt_then_save(dataset_dir, output_dir):
    from ppmoe.errors import NonFiniteError
    from ppmoe.train import Trainer

    trainer = Trainer(tiny_config(dataset_dir, output_dir, ["train.steps=2", "checkpoint.every=1"]))
    trainer.fit()
    with torch.no_grad():
        next(trainer.model.parameters()).view(-1)[0] = float("inf")
    try:
        trainer.save()
    except NonFiniteError as e:
        return str(e)
    return None


def test_a_non_finite_state_is_never_saved(tiny_dataset, tmp_path):
    error = run_ranks(corrupt_then_save, 1, tiny_dataset, str(tmp_path))[0]
    assert error and "not finite" in error and "step_00000002" in error
    assert [p.name for p in complete_checkpoints(tmp_path / "checkpoints")] == ["step_00000001", "step_00000002"]


def test_guard_and_spike_monitor_rules():
    guard = NonFiniteGuard("skip", 2)
    assert guard.bad_step(3, float("nan"), "step_2") == "continue"
    guard.good_step()
    assert guard.bad_step(5, float("inf"), "step_4") == "continue"
    with pytest.raises(Exception, match="2 steps in a row"):
        guard.bad_step(6, float("nan"), "step_4")
    spikes = LossSpikeMonitor(1.5)
    assert [spikes.observe(x) for x in (6.0, 5.0, 4.6)] == [None, None, None]
    assert spikes.observe(9.0) is not None and spikes.observe(float("nan")) is None
    assert LossSpikeMonitor(0).observe(100.0) is None
