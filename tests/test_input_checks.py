"""Start-up input checks (ppmoe.data.checks): a damaged or unsuitable dataset, an unwritable or full
output directory, and the prepare command's own config rules, each refused with one message that names
the file or key and the fix, before anything is written."""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from ppmoe.config import load_config, validate
from ppmoe.data import check_dataset, check_output_dir, checkpoint_bytes, iter_eval_batches, padded_model_vocab
from ppmoe.train.plan import stage_windows
from ppmoe.data import checks
from ppmoe.errors import DataError, RunDirError

REPO = Path(__file__).resolve().parents[1]
REPREPARE = "python -m ppmoe prepare CONFIG --overwrite"
WINDOWS = [(17, 4)]  # seq_len 16, global batch 4


@pytest.fixture
def dataset(tiny_dataset, tmp_path) -> Path:
    """A private copy of the tiny dataset (vocab 300, one train and one val shard) to damage."""
    return Path(shutil.copytree(tiny_dataset, tmp_path / "data"))


def meta_of(dataset: Path) -> dict:
    return json.loads((dataset / "meta.json").read_text())


def write_meta(dataset: Path, meta: dict) -> None:
    (dataset / "meta.json").write_text(json.dumps(meta))


def snapshot(directory: Path) -> dict:
    """Every file under `directory` with its size and modification time: equal before and after a check
    that wrote nothing."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(directory.rglob("*"))}


def refused(dataset: Path, *args, **kwargs) -> str:
    """check_dataset's DataError message, asserting the check changed nothing in the dataset."""
    before = snapshot(dataset)
    with pytest.raises(DataError) as info:
        check_dataset(dataset, *args, **kwargs)
    assert snapshot(dataset) == before
    return str(info.value)


def test_the_intact_dataset_passes(dataset):
    assert check_dataset(dataset, None, WINDOWS) == []
    assert check_dataset(dataset, 384, WINDOWS) == []  # model.vocab_size 300 padded to 384


# ---- meta.json ---------------------------------------------------------------------------------------

def test_missing_dataset_and_missing_meta(dataset, tmp_path):
    with pytest.raises(DataError, match=r"nowhere does not exist \(data.dataset_dir\).*python -m ppmoe prepare"):
        check_dataset(tmp_path / "nowhere", None, WINDOWS)
    (dataset / "meta.json").unlink()
    msg = refused(dataset, None, WINDOWS)
    assert f"{dataset} holds no meta.json" in msg and REPREPARE in msg


def test_meta_that_is_not_json(dataset):
    (dataset / "meta.json").write_text('{"vocab_size": 300, "dtype": "uint1')  # cut off mid-write
    msg = refused(dataset, None, WINDOWS)
    assert f"{dataset / 'meta.json'} is not valid JSON" in msg and REPREPARE in msg
    (dataset / "meta.json").write_text("[1, 2]")
    assert "must hold a JSON object" in refused(dataset, None, WINDOWS)


@pytest.mark.parametrize("field", ["vocab_size", "dtype", "shards", "tokens"])
def test_meta_missing_a_field(dataset, field):
    meta = meta_of(dataset)
    del meta[field]
    write_meta(dataset, meta)
    msg = refused(dataset, None, WINDOWS)
    assert f"{dataset / 'meta.json'} has no field {field!r}" in msg and REPREPARE in msg


@pytest.mark.parametrize("field, value", [("vocab_size", "300"), ("vocab_size", True), ("dtype", "float32"),
                                          ("dtype", "int99"), ("shards", {"train": ["train_00000.bin"]}),
                                          ("tokens", {"train": 10, "val": -1})])
def test_meta_field_of_the_wrong_type(dataset, field, value):
    meta = meta_of(dataset)
    meta[field] = value
    write_meta(dataset, meta)
    msg = refused(dataset, None, WINDOWS)
    assert f"field {field!r} must be" in msg and REPREPARE in msg


# ---- shards ------------------------------------------------------------------------------------------

def test_shard_truncated_to_an_odd_size(dataset):
    shard = dataset / "train_00000.bin"
    os.truncate(shard, shard.stat().st_size - 1)
    msg = refused(dataset, None, WINDOWS)
    assert f"shard {shard} is {shard.stat().st_size} bytes, not a whole number of uint16 tokens" in msg
    assert REPREPARE in msg


def test_shard_truncated_by_whole_tokens_and_empty(dataset):
    shard = dataset / "val_00000.bin"
    os.truncate(shard, 100)
    msg = refused(dataset, None, WINDOWS)
    assert "the val shards" in msg and "hold 50 tokens" in msg and f"says {meta_of(dataset)['tokens']['val']}" in msg
    os.truncate(shard, 0)
    assert f"shard {shard} is empty" in refused(dataset, None, WINDOWS)


def test_shard_deleted(dataset):
    (dataset / "train_00000.bin").unlink()
    msg = refused(dataset, None, WINDOWS)
    assert f"shard {dataset / 'train_00000.bin'}" in msg and "is missing" in msg and REPREPARE in msg


# ---- vocabulary ----------------------------------------------------------------------------------------

def small_vocab_config(tp: int):
    """model.vocab_size=200 (padded to 256) against the dataset's 300 tokens, at tensor-parallel size `tp`."""
    cfg = load_config(None, ["model.vocab_size=200", f"parallel.tp={tp}"])
    validate(cfg, tp)  # a valid config: only the dataset can tell the vocabulary is too small
    return cfg


@pytest.mark.parametrize("tp", [1, 2])
def test_model_vocab_smaller_than_the_tokenizer(dataset, tp):
    from ppmoe.model import model_shape

    cfg = small_vocab_config(tp)
    model_vocab = padded_model_vocab(cfg)
    assert model_vocab == model_shape(cfg, 300).vocab_size == 256  # the embedding the model would get, any tp
    msg = refused(dataset, model_vocab, stage_windows(cfg))
    assert msg.startswith("model.vocab_size:") and "smaller than the tokenizer's 300 tokens" in msg
    assert "set model.vocab_size to at least 300, or null to use the dataset's" in msg


def test_model_vocab_padded_over_the_tokenizer_passes(dataset):
    cfg = load_config(None, ["model.vocab_size=257", "model.vocab_multiple=64"])
    assert padded_model_vocab(cfg) == 320
    assert check_dataset(dataset, padded_model_vocab(cfg), WINDOWS) == []


def test_tokenizer_larger_than_meta_says(dataset):
    meta = meta_of(dataset)
    meta["vocab_size"] = 250  # the model would take 250 from meta.json; tokenizer.json has 300
    write_meta(dataset, meta)
    msg = refused(dataset, None, WINDOWS, scan_token_ids=False)
    assert "tokenizer.json has 300 tokens" in msg and "vocab_size=250" in msg and REPREPARE in msg
    assert "at least 300" in refused(dataset, 256, WINDOWS, scan_token_ids=False)


def test_token_id_beyond_the_vocabulary(dataset, monkeypatch):
    shard = dataset / "train_00000.bin"
    ids = np.fromfile(shard, dtype="<u2")
    ids[0] = 300  # meta.json's vocab_size: one past the last id
    ids.tofile(shard)
    msg = refused(dataset, None, WINDOWS)
    assert f"shard {shard} holds token id 300" in msg and "has 300 tokens" in msg and REPREPARE in msg
    assert check_dataset(dataset, None, WINDOWS, scan_token_ids=False) == []
    # Above FULL_SCAN_BYTES only blocks are read: the first block starts at the shard's first token.
    monkeypatch.setattr(checks, "FULL_SCAN_BYTES", 0)
    monkeypatch.setattr(checks, "SAMPLE_TOKENS", 1000)
    assert "holds token id 300" in refused(dataset, None, WINDOWS)


# ---- split sizes ---------------------------------------------------------------------------------------

def test_val_split_shorter_than_one_sample(dataset):
    val_tokens = meta_of(dataset)["tokens"]["val"]
    # What iter_eval_batches needs, exactly: one sample of window_len tokens (it wraps around a short split).
    list(iter_eval_batches(dataset, "val", val_tokens - 1, 4, 2))
    assert check_dataset(dataset, None, [(val_tokens, 4)])  # fits, with a note: one sample, batches of 4
    with pytest.raises(ValueError):
        list(iter_eval_batches(dataset, "val", val_tokens, 4, 1))
    cfg = load_config(None, [f"train.seq_len={val_tokens}"])
    msg = refused(dataset, None, stage_windows(cfg))
    assert f"the val split of {dataset} has {val_tokens} tokens, fewer than one sample of {val_tokens + 1}" in msg
    assert "data.val_fraction" in msg and "--overwrite" in msg and "train.seq_len" in msg
    notes = check_dataset(dataset, None, stage_windows(cfg), needs_val=False)  # a run that never validates
    assert not any("val split" in note for note in notes)


def test_train_split_shorter_than_one_sample(dataset):
    train_tokens = meta_of(dataset)["tokens"]["train"]
    msg = refused(dataset, None, [(train_tokens + 1, 4)])
    assert f"the train split of {dataset} has {train_tokens} tokens" in msg and "train.seq_len" in msg


def test_val_split_shorter_than_one_batch_is_a_note(dataset):
    notes = check_dataset(dataset, None, [(17, 100_000)])
    assert any("the val split" in n and "fewer than one batch of 100000" in n and "data.val_fraction" in n
               for n in notes)


@pytest.mark.parametrize("name", ["tiny_cpu", "tiny_patch_cpu", "tiny_growth_cpu"])
def test_stage_windows_are_the_plans_windows(name):
    from ppmoe.train.plan import build_stage_plan

    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    plan = build_stage_plan(cfg, 300)
    assert stage_windows(cfg) == [(s.patch_size * (s.cfg.train.seq_len + 1), s.cfg.train.global_batch_size)
                                for s in plan.stages]
    assert max(length for length, _ in stage_windows(cfg)) == (plan.chunk_len if plan.chunked_data
                                                             else cfg.train.seq_len + 1)


# ---- the output directory -----------------------------------------------------------------------------

def test_output_dir_below_a_file(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(RunDirError) as info:
        check_output_dir(tmp_path / "file.txt" / "run", 1)
    msg = str(info.value)
    assert f"output_dir={tmp_path / 'file.txt' / 'run'}" in msg and "is a file, not a directory" in msg
    assert "choose another output_dir" in msg


def test_unwritable_output_dir(tmp_path, monkeypatch):
    parent = tmp_path / "readonly"
    parent.mkdir()
    parent.chmod(0o500)
    if os.geteuid() == 0:  # root writes through permission bits: make the write itself fail instead
        def no_write(*args, **kwargs):
            raise PermissionError(13, "Permission denied")
        monkeypatch.setattr(tempfile, "mkstemp", no_write)
    try:
        with pytest.raises(RunDirError) as info:
            check_output_dir(parent / "run", 1, key="checkpoint.dir")
    finally:
        parent.chmod(0o700)
    msg = str(info.value)
    assert f"checkpoint.dir={parent / 'run'}: cannot write to {parent}" in msg and "Permission denied" in msg
    assert "choose a writable checkpoint.dir" in msg
    assert list(parent.iterdir()) == []  # neither the run directory nor a probe file was left


def test_too_little_free_space(tmp_path, monkeypatch):
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(100 << 30, 99 << 30, 1 << 30))
    needed = checkpoint_bytes(10**9)  # a 1B-parameter model: 12 GB a checkpoint
    with pytest.raises(RunDirError) as info:
        check_output_dir(tmp_path / "run", needed)
    msg = str(info.value)
    assert f"output_dir={tmp_path / 'run'}" in msg and "has 1.0 GiB free" in msg and "needs about 11.8 GiB" in msg
    assert "checkpoint.keep" in msg
    assert list(tmp_path.iterdir()) == []
    check_output_dir(tmp_path / "run", 1 << 20)  # enough: no error, still nothing created
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_bytes_counts_weights_and_adam_moments():
    margin = 64 << 20
    assert checkpoint_bytes(0) == margin
    assert checkpoint_bytes(10**6) == int(12 * 10**6 * 1.05) + margin
    assert checkpoint_bytes(10**6, checkpoints=3) == int(3 * 12 * 10**6 * 1.05) + margin


# ---- prepare's errors (that it refuses what training refuses: test_config_rules.py) -----------------------

def test_prepare_reports_bad_input_as_one_line(tmp_path, capsys):
    from ppmoe.cli import main

    (tmp_path / "only.txt").write_text("a single document")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"data": {"dataset_dir": str(tmp_path / "out"), "source": "files",
                                               "paths": [str(tmp_path / "*.txt")]}}))
    assert main(["prepare", str(config), "--set", "data.val_fraction=0"]) == 2
    assert capsys.readouterr().err == "ppmoe: config error: data.val_fraction must be in (0, 1), got 0.0\n"
    assert main(["prepare", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ppmoe: cannot prepare data.dataset_dir={tmp_path / 'out'}: ") and "at least 2" in err
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()


# ---- through the real command line ------------------------------------------------------------------------

def run_train(config: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for var in ("MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(var, None)
    args = [arg for item in overrides for arg in ("--set", item)]
    return subprocess.run([sys.executable, "-m", "ppmoe", "train", str(config), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("damage", ["truncated shard", "model vocab too small"])
def test_cli_train_refuses_a_damaged_dataset_in_one_line(dataset, tmp_path, damage):
    """Needs the trainer to call check_dataset (and check_output_dir) before it writes anything."""
    overrides = []
    if damage == "truncated shard":
        shard = dataset / "train_00000.bin"
        os.truncate(shard, shard.stat().st_size - 1)
        expected = f"shard {shard} is {shard.stat().st_size} bytes, not a whole number of uint16 tokens"
    else:
        overrides = ["model.vocab_size=200"]
        expected = "set model.vocab_size to at least 300"
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "run"), "data": {"dataset_dir": str(dataset)},
        "model": {"n_layers": 1, "d_model": 32, "n_heads": 4},
        "train": {"steps": 2, "seq_len": 16, "global_batch_size": 2, "micro_batch_size": 2, "warmup_steps": 1}}))
    proc = run_train(config, *overrides)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("ppmoe: ") and expected in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    assert not (tmp_path / "run").exists()  # refused before the run directory was created


def start_trainer(dataset_dir, output_dir, overrides):
    from ppmoe.errors import DataError
    from ppmoe.train import Trainer
    from test_parallel_equivalence import tiny_config

    try:
        Trainer(tiny_config(dataset_dir, output_dir, overrides))
    except DataError as e:
        return str(e)
    return None


@pytest.mark.parametrize("world,layout", [(1, []), (2, ["parallel.tp=2"])], ids=["tp1", "tp2"])
def test_a_model_vocabulary_below_the_tokenizer_is_refused_before_training(dataset, tmp_path, world, layout):
    """The real trainer on every rank (at TP=2 such a run used to train to the end on out-of-range
    targets): refused before the run directory is touched."""
    from multiproc import run_ranks

    messages = run_ranks(start_trainer, world, str(dataset), str(tmp_path / "run"),
                         ["model.vocab_size=100", "model.vocab_multiple=4", *layout])
    assert all(m and "model.vocab_size" in m and "smaller than the tokenizer" in m for m in messages), messages
    assert not (tmp_path / "run").exists()
