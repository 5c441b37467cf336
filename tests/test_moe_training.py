"""The MoE demo config trains: loss falls and every expert of every MoE layer receives tokens; a
Pipeline-MoE checkpoint saved at TP=2 loads at TP=1 and continues the same curve."""

from pathlib import Path

import pytest

from multiproc import run_ranks
from ppmoe.config import load_config
from ppmoe.train.metrics import read_metrics

REPO = Path(__file__).resolve().parent.parent


def train_demo(dataset_dir, output_dir, overrides):
    from ppmoe.train import Trainer

    cfg = load_config(REPO / "configs" / "tiny_moe_cpu.yaml", [
        f"data.dataset_dir={dataset_dir}", f"output_dir={output_dir}", "model.d_model=64",
        "train.seq_len=32", "train.steps=24", "train.log_every=4", "train.val_every=0", "train.warmup_steps=4",
        "train.lr=3e-3", *overrides])
    return Trainer(cfg).fit().last_step


def test_moe_demo_config_learns_and_uses_every_expert(tiny_dataset, tmp_path):
    run_ranks(train_demo, 2, tiny_dataset, str(tmp_path), ["checkpoint.every=0", "checkpoint.save_final=false"])
    metrics = read_metrics(tmp_path / "metrics.jsonl")
    steps = sorted(metrics)
    assert metrics[steps[-1]]["loss"] < metrics[steps[0]]["loss"] - 0.3
    loads = [metrics[s]["expert_load"] for s in steps]
    assert len(loads[0]) == 2 and len(loads[0][0]) == 8  # 2 MoE layers (every=2 of 4), 8 experts
    for layer in range(2):
        for expert in range(8):
            assert any(load[layer][expert] > 0 for load in loads), (layer, expert)
    for s in steps:
        assert sum(metrics[s]["expert_load"][0]) == pytest.approx(1.0, abs=1e-3)  # shares, rounded to 4 places
        assert metrics[s]["dropped_frac"] == 0.0  # dropless by default
        assert 0 < metrics[s]["aux_loss"] < 1 and metrics[s]["z_loss"] > 0


def test_pipeline_moe_checkpoint_reshards_tp2_to_tp1(tiny_dataset, tmp_path):
    """Experts are stored once per expert (DCP over DTensor shards), so a TP=2 checkpoint loads at TP=1."""
    straight = tmp_path / "straight"
    run_ranks(train_demo, 1, tiny_dataset, str(straight), ["parallel.tp=1", "checkpoint.save_final=false"])
    resharded = tmp_path / "resharded"
    run_ranks(train_demo, 2, tiny_dataset, str(resharded), ["train.steps=24", "checkpoint.every=12",
                                                            "train.log_every=4"])
    # Drop the final checkpoint: resume from step 12, saved at TP=2, on one process.
    import shutil
    shutil.rmtree(resharded / "checkpoints" / "step_00000024")
    (resharded / "metrics.jsonl").unlink()
    run_ranks(train_demo, 1, tiny_dataset, str(resharded), ["parallel.tp=1", "checkpoint.save_final=false"])
    a, b = read_metrics(straight / "metrics.jsonl"), read_metrics(resharded / "metrics.jsonl")
    assert sorted(b) == [16, 20, 24]  # resumed after step 12
    for step in (16, 20, 24):
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-5), step
