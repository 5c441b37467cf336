"""Stopping a run by signal through the real command line: Ctrl-C (SIGINT) finishes the step, saves and
exits 0, on one process and under torchrun (which forwards it to the ranks); a second Ctrl-C stops at once
without saving."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ppmoe.train.checkpoint import complete_checkpoints
from ppmoe.train.metrics import read_metrics

REPO = Path(__file__).resolve().parent.parent


def write_config(tmp_path, dataset_dir):
    config = tmp_path / "run.yaml"
    config.write_text(f"output_dir: {tmp_path}/run\ndata: {{dataset_dir: {dataset_dir}}}\n"
                      "model: {n_layers: 1, d_model: 32, n_heads: 4}\n"
                      "train: {steps: 1000000, seq_len: 16, global_batch_size: 4, micro_batch_size: 2, "
                      "log_every: 1, val_every: 0}\n")
    return config


def launch(cmd):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "120"}
    for var in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(var, None)
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def wait_for_steps(proc, metrics: Path, steps: int = 2, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not (metrics.exists() and metrics.read_text().count("\n") >= steps):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else "timeout"
        time.sleep(0.1)


def last_logged(run_dir: Path) -> int:
    return max(s for s, m in read_metrics(run_dir / "metrics.jsonl").items() if "loss" in m)


def test_ctrl_c_saves_and_exits_cleanly(tiny_dataset, tmp_path):
    config = write_config(tmp_path, tiny_dataset)
    proc = launch([sys.executable, "-m", "ppmoe", "train", str(config)])
    wait_for_steps(proc, tmp_path / "run" / "metrics.jsonl")
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "Ctrl-C: finishing this step" in out and "stop requested" in out
    saved = complete_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for p in saved] == [f"step_{last_logged(tmp_path / 'run'):08d}"]


def test_a_second_ctrl_c_stops_at_once_without_saving(tiny_dataset, tmp_path):
    # Steps of ~0.3 s, so the second Ctrl-C lands inside the step the first one asked to finish. (Two signals
    # sent at once would merge into one: the kernel keeps one pending SIGINT, so the test waits for the first.)
    config = write_config(tmp_path, tiny_dataset)
    proc = launch([sys.executable, "-m", "ppmoe", "train", str(config), "--set", "model.d_model=512",
                   "model.n_layers=4", "model.n_heads=8", "train.seq_len=128", "train.global_batch_size=8",
                   "train.micro_batch_size=8"])
    wait_for_steps(proc, tmp_path / "run" / "metrics.jsonl")
    proc.send_signal(signal.SIGINT)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("Ctrl-C: finishing this step"):
            proc.send_signal(signal.SIGINT)
            break
    out = "".join(lines) + proc.communicate(timeout=120)[0]
    assert proc.returncode != 0, out
    assert "Traceback" not in out, out  # the command line says what happened in one line
    assert "interrupted" in out and "not saved" in out, out
    assert not complete_checkpoints(tmp_path / "run" / "checkpoints")


def test_ctrl_c_under_torchrun_reaches_the_ranks_and_they_save(tiny_dataset, tmp_path):
    """torchrun runs its ranks in their own sessions: Ctrl-C in a terminal reaches the agent, which forwards it
    to the ranks and waits TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (30 by default) before killing them."""
    config = write_config(tmp_path, tiny_dataset)
    proc = launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                   "-m", "ppmoe", "train", str(config), "--set", "parallel.tp=2"])
    wait_for_steps(proc, tmp_path / "run" / "metrics.jsonl")
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=180)
    assert "stop requested" in out, out
    saved = complete_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for p in saved] == [f"step_{last_logged(tmp_path / 'run'):08d}"], out
