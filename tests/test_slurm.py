"""The SLURM launcher: the generated script's command, and the preemption path run for real with stand-in
`srun`/`scontrol`/`scancel` commands (SIGUSR1 to the batch shell -> ranks checkpoint and exit 0 ->
`scontrol requeue` -> the requeued job resumes and finishes)."""

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from multiproc import free_port
from ppmoe.launch.slurm import SlurmJob, render
from ppmoe.train.checkpoint import complete_checkpoints
from ppmoe.train.metrics import read_metrics

REPO = Path(__file__).resolve().parent.parent


def test_script_runs_torchrun_under_srun_with_c10d_rendezvous():
    script = render(SlurmJob(config="configs/x.yaml", nodes=4, gpus_per_node=8, partition="gpu", grace_s=240,
                             overrides=["train.lr=1e-4"]))
    assert "#SBATCH --nodes=4" in script and "#SBATCH --gpus-per-node=8" in script
    assert "#SBATCH --signal=B:USR1@240" in script and "#SBATCH --requeue" in script
    assert "#SBATCH --partition=gpu" in script
    assert "srun --kill-on-bad-exit=1 python -m ppmoe.launch.torchrun" in script
    assert '--rdzv-backend=c10d --rdzv-endpoint="$head_node:29500" --rdzv-id="$SLURM_JOB_ID"' in script
    assert '--nnodes="$SLURM_JOB_NUM_NODES" --nproc-per-node=8' in script
    assert "-m ppmoe train configs/x.yaml --set train.resume=auto train.lr=1e-4" in script
    assert "ssh" not in script and "hostfile" not in script
    with pytest.raises(ValueError, match="grace"):
        SlurmJob(config="c.yaml", grace_s=5)


def write_stub(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_preemption_checkpoints_requeues_and_resumes(tiny_dataset, tmp_path):
    stubs = tmp_path / "bin"
    stubs.mkdir()
    log = tmp_path / "slurm_calls.log"
    # srun: drop its own options and run the command on this machine (one node), recording its pid (the
    # torchrun agent's, once it execs).
    step_pid = tmp_path / "step.pid"
    write_stub(stubs, "srun", f'while [[ "$1" == --* ]]; do shift; done\necho $$ > {step_pid}\nexec "$@"\n')
    write_stub(stubs, "scontrol", f'if [ "$1" = show ]; then echo localhost; else echo "scontrol $*" >> {log}; fi\n')
    # scancel --signal=USR1 JOB.STEP: signal every process of the step (what slurmstepd does): the agent this
    # test started and its children, by pid (never by name: other runs on the machine are not ours).
    write_stub(stubs, "scancel", f'echo "scancel $*" >> {log}\nagent=$(cat {step_pid})\n'
               'for pid in $agent $(pgrep -P "$agent"); do kill -USR1 "$pid"; done\n')

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "run"), "data": {"dataset_dir": tiny_dataset},
        "model": {"n_layers": 2, "d_model": 32, "n_heads": 4},
        "train": {"steps": 100000, "seq_len": 16, "global_batch_size": 4, "micro_batch_size": 2,
                  "log_every": 1, "val_every": 0, "warmup_steps": 1}}))
    script = tmp_path / "job.sbatch"
    script.write_text(render(SlurmJob(config=str(config), gpus_per_node=2, python=sys.executable,
                                      workdir=str(REPO), port=free_port(), grace_s=60)))
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "node1", "SLURM_JOB_NUM_NODES": "1", "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 180
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        assert job.poll() is None and time.time() < deadline, job.stdout.read() if job.poll() is not None else "timeout"
        time.sleep(0.2)
    job.send_signal(signal.SIGUSR1)  # what `--signal=B:USR1@grace` does before the time limit
    out, _ = job.communicate(timeout=180)
    assert job.returncode == 0, out
    calls = log.read_text()
    assert "scancel --signal=USR1 4242.0" in calls and "scontrol requeue 4242" in calls
    saved = complete_checkpoints(tmp_path / "run" / "checkpoints")
    assert len(saved) == 1
    stopped_at = int(saved[0].name.split("_")[1])
    assert max(read_metrics(metrics)) == stopped_at  # the step in flight finished, then it saved

    # The requeued job: same script, resumes from the checkpoint (here: runs 2 more steps and ends).
    config.write_text(config.read_text().replace("steps: 100000", f"steps: {stopped_at + 2}"))
    log.unlink()
    rerun = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=180)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"resumed from {saved[0]}" in rerun.stdout
    assert max(read_metrics(metrics)) == stopped_at + 2
    assert not log.exists()  # finished normally: no requeue
