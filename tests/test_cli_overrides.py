"""Command-line overrides: repeated --set accumulate (train, prepare, slurm), a mapping merges into a
section instead of replacing it, null for a section is refused, list-index overrides keep working."""

from __future__ import annotations

import pytest
import yaml

from ppmoe.cli import main, parse_args
from ppmoe.config import ConfigError, load_config

NULL_SECTION_HINT = "set its keys one by one"


def write_yaml(tmp_path, data, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def base_yaml(tmp_path):
    """A YAML file with values in every place the overrides below touch."""
    return write_yaml(tmp_path, {
        "output_dir": "runs/from_yaml",
        "model": {"n_layers": 4, "d_model": 64, "n_heads": 4},
        "train": {"steps": 50, "lr": 1e-3},
        "growth": {"ops": {"depth": "identity", "noise": 0.02},
                   "stages": [{"name": "small", "share": 0.4, "model": {"n_layers": 2}},
                              {"name": "full", "share": 0.6}]},
    })


def config_error(path, overrides) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


# ---- repeated --set --------------------------------------------------------------------------------

def test_repeated_set_accumulates_in_order(base_yaml):
    cfg = load_config(base_yaml, ["output_dir=runs/x", "train.steps=3"])
    assert (cfg.output_dir, cfg.train.steps) == ("runs/x", 3)

    args = parse_args(["train", str(base_yaml), "--set", "output_dir=runs/x", "--set", "train.steps=3",
                       "train.lr=2e-3", "--set", "train.steps=4"])
    assert args.overrides == ["output_dir=runs/x", "train.steps=3", "train.lr=2e-3", "train.steps=4"]
    cfg = load_config(args.config, args.overrides)
    assert cfg.output_dir == "runs/x" and cfg.train.lr == 2e-3
    assert cfg.train.steps == 4  # the later of two values for one key wins
    assert cfg.model.n_layers == 4  # untouched YAML values stay


@pytest.mark.parametrize("command", [["prepare"], ["slurm"]])
def test_repeated_set_accumulates_for_every_command(base_yaml, command):
    args = parse_args([*command, str(base_yaml), "--set", "train.steps=3", "--set", "output_dir=runs/y"])
    assert args.overrides == ["train.steps=3", "output_dir=runs/y"]
    assert parse_args([*command, str(base_yaml)]).overrides == []


def test_slurm_script_carries_every_set(base_yaml, tmp_path, capsys):
    out = tmp_path / "job.sbatch"
    code = main(["slurm", str(base_yaml), "--nodes", "2", "--set", "train.lr=1e-4", "--set", "output_dir=runs/z",
                 "train.steps=9", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert "--set train.resume=auto train.lr=1e-4 output_dir=runs/z train.steps=9" in out.read_text()


def test_slurm_refuses_a_bad_override_before_writing(base_yaml, tmp_path, capsys):
    out = tmp_path / "job.sbatch"
    assert main(["slurm", str(base_yaml), "--set", "model=null", "--out", str(out)]) == 2
    assert "ppmoe: config error: model is a section" in capsys.readouterr().err
    assert not out.exists()


# ---- mappings merge into sections --------------------------------------------------------------------

def test_section_mapping_merges_into_the_yaml_section(base_yaml):
    cfg = load_config(base_yaml, ["model={n_layers: 2}"])
    assert cfg.model.n_layers == 2 and cfg.model.d_model == 64 and cfg.model.n_heads == 4

    args = parse_args(["train", str(base_yaml), "--set", "model={n_layers: 2}", "--set", "model={n_heads: 2}"])
    cfg = load_config(args.config, args.overrides)
    assert (cfg.model.n_layers, cfg.model.d_model, cfg.model.n_heads) == (2, 64, 2)


def test_nested_section_mapping_merges_at_every_level(base_yaml):
    cfg = load_config(base_yaml, ["growth={ops: {noise: 0.0}}"])
    assert cfg.growth.ops.noise == 0.0 and cfg.growth.ops.depth == "identity"  # YAML's depth kept
    assert [s.name for s in cfg.growth.stages] == ["small", "full"]  # a sibling key the mapping did not name
    cfg = load_config(base_yaml, ["growth.ops={experts: split}"])
    assert cfg.growth.ops.experts == "split" and cfg.growth.ops.noise == 0.02


def test_section_mapping_without_yaml_section_and_empty_yaml_section(tmp_path):
    assert load_config(None, ["train={steps: 5}"]).train.steps == 5
    path = tmp_path / "empty_section.yaml"
    path.write_text("model:\ntrain:\n  steps: 7\n")  # `model:` with nothing under it is an empty section
    cfg = load_config(path, ["model.n_layers=3"])
    assert cfg.model.n_layers == 3 and cfg.train.steps == 7


@pytest.mark.parametrize("override, key", [("model=null", "model"), ("model=", "model"),
                                           ("growth.ops=null", "growth.ops"),
                                           ("growth={ops: null}", "growth.ops"),
                                           ("growth.stages.0=null", "growth.stages.0")])
def test_null_for_a_section_is_refused(base_yaml, override, key):
    msg = config_error(base_yaml, [override])
    assert msg.startswith(f"{key} is a section") and NULL_SECTION_HINT in msg
    assert f"--set {key}.KEY=VALUE" in msg


def test_null_for_an_optional_key_still_resets_it(base_yaml):
    cfg = load_config(base_yaml, ["model.vocab_size=null", "train.peak_flops=null"])
    assert cfg.model.vocab_size is None and cfg.train.peak_flops is None


def test_mapping_for_a_non_section_key_is_type_checked(base_yaml):
    msg = config_error(base_yaml, ["train.lr={a: 1}"])
    assert "train.lr must be float" in msg
    assert "must be a mapping" in config_error(base_yaml, ["model=[1, 2]"])
    msg = config_error(base_yaml, ["model={n_layerz: 2}"])
    assert "model.n_layerz" in msg and "model.n_layers" in msg  # unknown keys inside a mapping are named


# ---- list indices and the stages' partial overrides ---------------------------------------------------

def test_list_index_overrides_still_work(base_yaml):
    cfg = load_config(base_yaml, ["growth.stages.0.share=0.3", "growth.stages.1.share=0.5",
                                  "growth.stages.2.share=0.2", "growth.stages.2.name=extra"])
    assert [(s.name, s.share) for s in cfg.growth.stages] == [("small", 0.3), ("full", 0.5), ("extra", 0.2)]
    msg = config_error(base_yaml, ["growth.stages.5.share=0.1"])
    assert "growth.stages is a list of 2 elements" in msg


def test_stage_model_mapping_is_the_stages_override_merged(base_yaml):
    cfg = load_config(base_yaml, ["growth.stages.0.model={d_model: 32}"])
    assert cfg.growth.stages[0].model == {"n_layers": 2, "d_model": 32}  # merged into the YAML's mapping
    cfg = load_config(base_yaml, ["growth.stages.1.model={n_layers: 3}"])
    assert cfg.growth.stages[1].model == {"n_layers": 3}
    cfg = load_config(base_yaml, ["growth.stages.0={share: 0.5, model: {d_model: 32}}"])
    stage = cfg.growth.stages[0]
    assert (stage.name, stage.share, stage.model) == ("small", 0.5, {"n_layers": 2, "d_model": 32})
    assert "must be a mapping" in config_error(base_yaml, ["growth.stages.0.model=3"])
