"""End to end through the real launcher: `torchrun ... -m ppmoe train`, and the shipped configs."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ppmoe.config import load_config, validate
from ppmoe.train.checkpoint import complete_checkpoints
from ppmoe.train.metrics import read_metrics

REPO = Path(__file__).resolve().parent.parent


def torchrun(nproc, *args, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "ppmoe", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def write_config(path, dataset_dir, output_dir):
    path.write_text(yaml.safe_dump({
        "output_dir": str(output_dir),
        "data": {"dataset_dir": dataset_dir},
        "model": {"n_layers": 2, "d_model": 32, "n_heads": 4},
        "train": {"steps": 4, "seq_len": 16, "global_batch_size": 4, "micro_batch_size": 2, "log_every": 2,
                  "val_every": 2, "val_batches": 1, "warmup_steps": 1},
    }))
    return path


def test_torchrun_tp2_writes_metrics_config_and_checkpoint(tiny_dataset, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tiny_dataset, tmp_path / "run")
    proc = torchrun(2, "train", str(cfg), "--set", "parallel.tp=2", "train.lr=1e-3")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "tp 2 x pp 1 x dp 1" in proc.stdout
    metrics = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert sorted(metrics) == [2, 4]
    for record in metrics.values():
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_sec", "val_loss"} <= record.keys()
        assert record["tokens_per_sec"] > 0 and record["loss"] > 0
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["parallel"]["tp"] == 2 and saved["train"]["lr"] == 1e-3  # overrides are what was saved
    assert [p.name for p in complete_checkpoints(tmp_path / "run" / "checkpoints")] == ["step_00000004"]


def test_torchrun_world_size_mismatch_is_a_clear_error(tiny_dataset, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tiny_dataset, tmp_path / "run")
    proc = torchrun(2, "train", str(cfg), "--set", "parallel.tp=1", "parallel.dp=1")
    assert proc.returncode != 0
    assert "ppmoe: config error" in proc.stderr and "world size is 2" in proc.stderr
    # torchrun reports the failed child with its own traceback; ppmoe's code must not have raised one.
    assert not re.search(r'File ".*ppmoe/', proc.stderr)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_missing_dataset_says_how_to_prepare(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", str(tmp_path / "nowhere"), tmp_path / "run")
    proc = subprocess.run([sys.executable, "-m", "ppmoe", "train", str(cfg)], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert proc.returncode == 2
    assert "ppmoe prepare" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("name,world,vocab", [("tiny_cpu", 1, 4096), ("tiny_cpu", 2, 4096),
                                              ("tiny_moe_cpu", 2, 4096), ("gpt_350m_8gpu", 8, 32768),
                                              ("moe_gpt3_medium_64e_tp8", 8, 32768),
                                              ("moe_gpt3_medium_64e_tp8", 16, 32768),
                                              ("moe_143b_tp8_pp16", 128, 32768), ("tiny_patch_cpu", 1, 4096),
                                              ("patch_370m_8gpu", 8, 32768)])
def test_shipped_configs_are_valid(name, world, vocab):
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    dp = validate(cfg, world)
    assert cfg.train.global_batch_size % (cfg.train.micro_batch_size * dp) == 0
