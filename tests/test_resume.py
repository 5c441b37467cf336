"""Checkpoints: a killed run resumes and continues the uninterrupted run's loss curve; SIGTERM saves
and exits cleanly; half-written checkpoints are never picked up; a checkpoint loads at another TP/DP
layout."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from multiproc import run_ranks, run_ranks_expecting_death
from ppmoe.train.checkpoint import CheckpointManager, complete_checkpoints
from ppmoe.train.metrics import read_metrics
from test_parallel_equivalence import tiny_config

STEPS = 8
REPO = Path(__file__).resolve().parent.parent


def train(dataset_dir, output_dir, overrides, kill_at_step=None):
    """Train; with kill_at_step, SIGKILL this process just before that step runs (no chance to save)."""
    from ppmoe.train import Trainer

    trainer = Trainer(tiny_config(dataset_dir, output_dir, [f"train.steps={STEPS}", *overrides]))
    if kill_at_step is not None:
        die_before_step(trainer, kill_at_step)
    return trainer.fit().last_step


def die_before_step(trainer, step: int) -> None:
    """SIGKILL the process just before `trainer` runs optimizer step `step` (no chance to save)."""
    original = trainer.train_step

    def train_step_or_die():
        if trainer.step + 1 == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return original()

    trainer.train_step = train_step_or_die


def run_killed(world_size, *args):
    """Run `train` on world_size forked ranks that all SIGKILL themselves; return their exit codes."""
    return run_ranks_expecting_death(train, world_size, *args)


def losses(run_dir):
    metrics = read_metrics(Path(run_dir) / "metrics.jsonl")
    return {step: m["loss"] for step, m in metrics.items() if "loss" in m}


@pytest.fixture(scope="module")
def uninterrupted(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    run_ranks(train, 1, tiny_dataset, str(out), [])
    return losses(out)


@pytest.mark.parametrize("world,overrides", [(1, []), (2, ["parallel.tp=2"])], ids=["single", "tp2"])
def test_killed_run_resumes_same_curve(world, overrides, uninterrupted, tiny_dataset, tmp_path):
    common = ["checkpoint.every=3", *overrides]
    codes = run_killed(world, tiny_dataset, str(tmp_path), common, 5)
    assert codes == [-signal.SIGKILL] * world
    assert [p.name for p in complete_checkpoints(tmp_path / "checkpoints")] == ["step_00000003"]
    assert max(losses(tmp_path)) == 4  # steps 1-4 ran; step 4's work is lost with the kill

    assert run_ranks(train, world, tiny_dataset, str(tmp_path), common)[0] == STEPS
    resumed = losses(tmp_path)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    # Single process: bit-identical. TP=2 sums in another order: fp32 rounding only.
    tol = 0 if world == 1 else 1e-5
    for step in range(4, STEPS + 1):
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=tol, abs=0), step


def test_resume_at_other_layout(uninterrupted, tiny_dataset, tmp_path):
    """Saved by one process, resumed by tp=2 x dp=2 (FSDP): training continues on the same curve."""
    codes = run_killed(1, tiny_dataset, str(tmp_path), ["checkpoint.every=3"], 5)
    assert codes == [-signal.SIGKILL]
    run_ranks(train, 4, tiny_dataset, str(tmp_path), ["checkpoint.every=3", "parallel.tp=2"])
    resumed = losses(tmp_path)
    for step in range(4, STEPS + 1):
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-5, abs=0), step


def test_sigterm_saves_and_exits_cleanly(tiny_dataset, tmp_path):
    cmd = [sys.executable, "-m", "ppmoe", "train", "--help"]
    config = tmp_path / "run.yaml"
    config.write_text(f"output_dir: {tmp_path}/run\ndata: {{dataset_dir: {tiny_dataset}}}\n"
                      "model: {n_layers: 1, d_model: 32, n_heads: 4}\n"
                      "train: {steps: 1000000, seq_len: 16, global_batch_size: 4, micro_batch_size: 2, "
                      "log_every: 1, val_every: 0}\n")
    cmd = [sys.executable, "-m", "ppmoe", "train", str(config)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else "timeout"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "stop requested" in out
    saved = complete_checkpoints(tmp_path / "run" / "checkpoints")
    assert len(saved) == 1
    last_logged = max(losses(tmp_path / "run"))
    assert saved[0].name == f"step_{last_logged:08d}"


def test_half_written_checkpoints_are_ignored(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step_00000004").mkdir(parents=True)
    (root / "step_00000004" / ".metadata").write_text("x")
    (root / "step_00000009.tmp").mkdir()  # a save that crashed before its rename
    (root / "step_00000007").mkdir()  # no .metadata: not a finished DCP checkpoint
    assert CheckpointManager(root, keep=3, rank=0).latest() == root / "step_00000004"
    assert CheckpointManager(tmp_path / "absent", keep=3, rank=0).latest() is None


def loaded_full_params(dataset_dir, output_dir, overrides):
    """Build a trainer at this layout, load the newest checkpoint, return the full parameters (rank 0)."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from ppmoe.train import Trainer

    trainer = Trainer(tiny_config(dataset_dir, output_dir, [f"train.steps={STEPS}", *overrides]))
    trainer.maybe_resume()
    params = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
              for n, p in trainer.model.named_parameters()}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, params)  # pipeline ranks hold different layers
    merged = {}
    for part in gathered:
        merged.update(part)
    return merged, trainer.step


PP_MOE = ["model.n_layers=4", "moe.num_experts=4", "moe.top_k=2"]


def test_tp2_pp2_checkpoint_loads_at_tp1_pp1_and_dp4(tiny_dataset, tmp_path):
    """Saved at tp2 x pp2 (Pipeline-MoE inside the stages), loaded at one process and at dp=4 (FSDP):
    identical parameters, and training continues the uninterrupted run's loss curve."""
    codes = run_killed(4, tiny_dataset, str(tmp_path / "saved"),
                       [*PP_MOE, "parallel.tp=2", "parallel.pp=2", "checkpoint.every=3"], 5)
    assert codes == [-signal.SIGKILL] * 4
    single, step1 = run_ranks(loaded_full_params, 1, tiny_dataset, str(tmp_path / "saved"), PP_MOE)[0]
    dp4, step4 = run_ranks(loaded_full_params, 4, tiny_dataset, str(tmp_path / "saved"), PP_MOE)[0]
    assert step1 == step4 == 3
    assert single.keys() == dp4.keys() and any("experts" in k for k in single)
    for name in single:
        assert torch.equal(single[name], dp4[name]), name

    straight = tmp_path / "straight"
    run_ranks(train, 1, tiny_dataset, str(straight), PP_MOE)
    for world, out in [(1, "saved"), (4, "saved_dp4")]:
        if out == "saved_dp4":
            import shutil
            shutil.copytree(tmp_path / "saved" / "checkpoints", tmp_path / out / "checkpoints")
        run_ranks(train, world, tiny_dataset, str(tmp_path / out), [*PP_MOE, "checkpoint.save_final=false"])
        resumed, expected = losses(tmp_path / out), losses(straight)
        for step in range(4, STEPS + 1):
            assert resumed[step] == pytest.approx(expected[step], rel=1e-5), (out, step)
