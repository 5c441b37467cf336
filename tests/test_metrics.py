"""Run tracking: metrics.jsonl, the console line and the wandb sink (with a stand-in wandb module:
the real one needs a network or an account; the sink's contract with it is what is tested)."""

import json
import sys
import types

import pytest

from ppmoe.config import load_config
from ppmoe.train.metrics import MetricsLogger, format_line, read_metrics


class FakeRun:
    def __init__(self, **kwargs):
        self.kwargs, self.logged, self.finished = kwargs, [], False

    def log(self, data, step):
        self.logged.append((step, data))

    def finish(self):
        self.finished = True


@pytest.fixture
def fake_wandb(monkeypatch):
    module = types.SimpleNamespace(runs=[])

    def init(**kwargs):
        module.runs.append(FakeRun(**kwargs))
        return module.runs[-1]

    module.init = init
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


RECORD = {"step": 10, "phase": "token", "loss": 3.25, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_sec": 12345.0,
          "mfu": 0.42, "memory_gib": 1.5, "aux_loss": 0.011, "z_loss": 0.002, "dropped_frac": 0.0,
          "expert_load": [[0.5, 0.5], [0.75, 0.25]], "val_loss": 3.5}


@pytest.mark.parametrize("api_key,expected_mode", [(None, "offline"), ("secret", "online")])
def test_wandb_sink_logs_every_record_offline_without_a_key(fake_wandb, monkeypatch, tmp_path, api_key,
                                                           expected_mode):
    if api_key:
        monkeypatch.setenv("WANDB_API_KEY", api_key)
    else:
        monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = load_config(None, ["logging.wandb=true", "logging.wandb_project=proj", "train.lr=0.002"])
    logger = MetricsLogger(cfg, tmp_path, is_main=True)
    logger.log(RECORD)
    logger.close()
    (run,) = fake_wandb.runs
    assert run.kwargs["mode"] == expected_mode and run.kwargs["project"] == "proj"
    assert run.kwargs["name"] == tmp_path.name and run.kwargs["config"]["train"]["lr"] == 0.002
    assert run.logged == [(10, {k: v for k, v in RECORD.items() if k != "step"})] and run.finished
    assert read_metrics(tmp_path / "metrics.jsonl")[10] == RECORD


def test_non_main_ranks_write_nothing(fake_wandb, tmp_path):
    cfg = load_config(None, ["logging.wandb=true"])
    MetricsLogger(cfg, tmp_path, is_main=False).log(RECORD)
    assert not (tmp_path / "metrics.jsonl").exists() and not fake_wandb.runs


def test_wandb_missing_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import fails
    with pytest.raises(ImportError, match=r"pip install 'ppmoe\[wandb\]'"):
        MetricsLogger(load_config(None, ["logging.wandb=true"]), tmp_path, is_main=True)


def test_console_line_has_the_progress_fields():
    line = format_line(RECORD, total_steps=100)
    for part in ("step     10/100", "loss 3.2500", "lr 1.00e-03", "grad 0.500", "tok/s 12,345", "mfu 42.0%",
                 "aux 0.011", "drop 0.0%", "load max 1.0x/1.5x", "mem 1.50GiB", "val 3.5000"):
        assert part in line, part
    patch = format_line({**RECORD, "phase": "patch", "val_patch_loss": 4.0}, total_steps=100)
    assert patch.split(" | ")[1] == "patch" and "val(patch) 4.0000" in patch


def test_later_records_of_a_step_win(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [{"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0},
                                                      {"step": 2, "loss": 3.9, "val_loss": 4.1}]) + "\n")
    assert read_metrics(path) == {1: {"step": 1, "loss": 5.0}, 2: {"step": 2, "loss": 3.9, "val_loss": 4.1}}
