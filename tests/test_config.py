"""Tests of ppmoe.config: loading (defaults < YAML < --set), key/type checking, configs that validate,
save/load round trips, the generated reference, and how the CLI reports config errors. The message of
each rule a config can break is tested once, in test_config_rules.py."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from ppmoe.config import (ConfigError, ExperimentConfig, ModelConfig, TrainConfig,
                          load_config, save_config, to_dict, validate)
from ppmoe.config import schema
from ppmoe.config.docs import reference_markdown
from ppmoe.config.loader import parse_override

REPO = Path(__file__).resolve().parents[1]
SECTIONS = [f.name for f in dataclasses.fields(ExperimentConfig)
            if dataclasses.is_dataclass(typing.get_type_hints(ExperimentConfig)[f.name])]


def write_yaml(tmp_path: Path, data, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def config_error(*args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(*args, **kwargs)
    return str(info.value)


# ---- loading: defaults, YAML, overrides ----------------------------------------------------------

def test_defaults_without_file_equal_dataclass_defaults():
    assert load_config() == ExperimentConfig()
    assert load_config(None, []) == ExperimentConfig()


def test_empty_yaml_gives_defaults(tmp_path):
    assert load_config(write_yaml(tmp_path, "")) == ExperimentConfig()
    assert load_config(write_yaml(tmp_path, "train:\n")) == ExperimentConfig()


def test_yaml_values_are_applied(tmp_path):
    path = write_yaml(tmp_path, {"output_dir": "runs/x", "model": {"d_model": 32, "n_kv_heads": 2},
                                 "parallel": {"dp_type": "ddp"}, "data": {"paths": ["a/*.txt", "b.txt"]}})
    cfg = load_config(path)
    assert cfg.output_dir == "runs/x"
    assert cfg.model.d_model == 32 and cfg.model.n_kv_heads == 2
    assert cfg.model.n_layers == ModelConfig().n_layers  # untouched keys keep their defaults
    assert cfg.parallel.dp_type == "ddp"
    assert cfg.data.paths == ["a/*.txt", "b.txt"]


def test_precedence_override_over_yaml_over_default(tmp_path):
    path = write_yaml(tmp_path, {"train": {"lr": 1e-3, "steps": 7, "seed": 5}})
    cfg = load_config(path, ["train.lr=2e-3", "train.steps=9"])
    assert cfg.train.lr == 2e-3  # override beats YAML
    assert cfg.train.steps == 9
    assert cfg.train.seed == 5  # YAML beats default
    assert cfg.train.warmup_steps == TrainConfig().warmup_steps  # default
    # Later overrides of the same key win.
    assert load_config(path, ["train.steps=3", "train.steps=4"]).train.steps == 4


def test_override_values_are_parsed_as_yaml():
    cfg = load_config(None, [
        "train.lr=3e-4",  # YAML 1.1 reads this as a string; float fields still accept it
        "train.min_lr=1.5e-5",
        "train.peak_flops=1e15",
        "model.n_kv_heads=2",
        "model.tie_embeddings=true",
        "data.paths=[a.txt, 'b c.txt']",
        "data.tokenizer=null",
        "output_dir=runs/with=equals",  # only the first '=' splits key and value
    ])
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == 3e-4
    assert cfg.train.min_lr == 1.5e-5
    assert isinstance(cfg.train.peak_flops, float) and cfg.train.peak_flops == 1e15
    assert cfg.model.n_kv_heads == 2 and isinstance(cfg.model.n_kv_heads, int)
    assert cfg.model.tie_embeddings is True
    assert cfg.data.paths == ["a.txt", "b c.txt"]
    assert cfg.data.tokenizer is None
    assert cfg.output_dir == "runs/with=equals"


def test_override_null_resets_yaml_value(tmp_path):
    path = write_yaml(tmp_path, {"model": {"n_kv_heads": 2, "ffn_hidden": 96}})
    cfg = load_config(path, ["model.n_kv_heads=null", "model.ffn_hidden="])
    assert cfg.model.n_kv_heads is None
    assert cfg.model.ffn_hidden is None


def test_int_accepted_for_float_field(tmp_path):
    cfg = load_config(write_yaml(tmp_path, {"train": {"lr": 1, "grad_clip": 0}}))
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.grad_clip == 0.0 and isinstance(cfg.train.grad_clip, float)


def test_override_without_equals_errors():
    msg = config_error(None, ["train.lr"])
    assert "train.lr" in msg and "section.key=value" in msg
    with pytest.raises(ConfigError):
        parse_override("just-a-word")


def test_parse_override_strips_key():
    assert parse_override(" train.lr =0.5") == ("train.lr", 0.5)
    assert parse_override("train.steps=") == ("train.steps", None)


def test_nested_override_into_non_section_errors(tmp_path):
    # A scalar already there (from an earlier override or the YAML file): it cannot hold a sub-key.
    msg = config_error(None, ["train.lr=0.1", "train.lr.x=1"])
    assert "train.lr.x" in msg and "lr is not a section" in msg
    msg = config_error(write_yaml(tmp_path, {"output_dir": "runs/a"}), ["output_dir.sub=1"])
    assert "output_dir.sub" in msg and "not a section" in msg
    # No scalar in the raw data yet: the type check still refuses a mapping for a scalar key.
    msg = config_error(None, ["train.steps.x=1"])
    assert "train.steps" in msg and "int" in msg


def test_section_must_be_mapping(tmp_path):
    msg = config_error(write_yaml(tmp_path, {"train": 5}))
    assert "train" in msg and "mapping" in msg
    msg = config_error(None, ["model=3"])
    assert "model" in msg and "mapping" in msg


def test_top_level_must_be_mapping(tmp_path):
    msg = config_error(write_yaml(tmp_path, "- a\n- b\n"))
    assert "mapping" in msg and "list" in msg


def test_missing_file_errors(tmp_path):
    missing = tmp_path / "nope.yaml"
    msg = config_error(missing)
    assert str(missing) in msg and "does not exist" in msg


# ---- unknown keys ------------------------------------------------------------------------------

def test_unknown_key_names_full_key_suggests_and_lists_allowed(tmp_path):
    msg = config_error(write_yaml(tmp_path, {"train": {"lrr": 1e-3}}))
    assert "'train.lrr'" in msg
    assert "Did you mean 'train.lr'?" in msg
    allowed = [f.name for f in dataclasses.fields(TrainConfig)]
    for name in allowed:
        assert name in msg
    assert ", ".join(sorted(allowed)) in msg


def test_unknown_key_through_override():
    msg = config_error(None, ["model.n_head=8"])
    assert "'model.n_head'" in msg and "Did you mean 'model.n_heads'?" in msg


def test_unknown_key_without_close_match_has_no_suggestion(tmp_path):
    msg = config_error(write_yaml(tmp_path, {"parallel": {"zzzzzz": 1}}))
    assert "'parallel.zzzzzz'" in msg
    assert "Did you mean" not in msg
    assert "dp, dp_type, pp, pp_layers, pp_schedule, pp_virtual_stages, sequence_parallel, tp" in msg


def test_unknown_section(tmp_path):
    msg = config_error(write_yaml(tmp_path, {"trian": {"lr": 1e-3}}))
    assert "'trian'" in msg and "Did you mean 'train'?" in msg
    for section in SECTIONS + ["output_dir"]:
        assert section in msg.split("Allowed keys here:")[1]


# ---- types ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("yaml_text, key, expected", [
    ("train:\n  steps: abc\n", "train.steps", "int"),
    ("train:\n  steps: true\n", "train.steps", "int"),  # bool is not an int here
    ("train:\n  steps: 1.5\n", "train.steps", "int"),
    ("train:\n  lr: fast\n", "train.lr", "float"),
    ("train:\n  lr: false\n", "train.lr", "float"),
    ("model:\n  tie_embeddings: 1\n", "model.tie_embeddings", "bool"),
    ("model:\n  n_kv_heads: yes\n", "model.n_kv_heads", "int"),  # Optional[int] still rejects bool
    ("output_dir: 3\n", "output_dir", "str"),
    ("train:\n  resume: null\n", "train.resume", "str"),
])
def test_wrong_type_names_key_and_expected_type(tmp_path, yaml_text, key, expected):
    msg = config_error(write_yaml(tmp_path, yaml_text))
    assert msg.startswith(key + " ") and f"must be {expected}" in msg


def test_list_field_checks_type_and_items(tmp_path):
    msg = config_error(write_yaml(tmp_path, {"data": {"paths": "a.txt"}}))
    assert "data.paths" in msg and "list" in msg
    msg = config_error(write_yaml(tmp_path, {"data": {"paths": ["a.txt", 3]}}))
    assert "data.paths[1]" in msg and "str" in msg


@pytest.mark.parametrize("key, bad, allowed", [
    ("parallel.dp_type", "zero3", ["fsdp", "ddp"]),
    ("train.dtype", "fp16", ["auto", "fp32", "bf16"]),
    ("data.source", "web", ["shakespeare", "files", "hf"]),
    ("logging.wandb_mode", "disabled", ["auto", "online", "offline"]),
])
def test_literal_rejects_bad_values_listing_allowed(key, bad, allowed):
    msg = config_error(None, [f"{key}={bad}"])
    assert msg.startswith(key) and repr(bad) in msg
    for value in allowed:
        assert repr(value) in msg
    section, name = key.split(".")
    assert getattr(getattr(load_config(None, [f"{key}={allowed[-1]}"]), section), name) == allowed[-1]


# ---- validate: what is accepted (what is refused: test_config_rules.py) ---------------------------

def cfg_with(*overrides: str) -> ExperimentConfig:
    return load_config(None, list(overrides))


def test_defaults_validate_on_one_process():
    assert validate(ExperimentConfig(), 1) == 1


@pytest.mark.parametrize("world_size, overrides, dp", [
    (1, [], 1),
    (2, [], 2),
    (8, ["parallel.tp=2", "train.global_batch_size=16"], 4),
    (4, ["parallel.tp=4"], 1),  # the derived ffn_hidden (8/3 * 64 -> 192) divides by tp
    (4, ["parallel.tp=2", "parallel.dp=2"], 2),
    (4, ["train.global_batch_size=16", "train.micro_batch_size=4"], 4),
    (2, ["model.n_layers=4", "train.global_batch_size=8", "train.micro_batch_size=2", "parallel.pp=2"], 1),
    (2, ["moe.num_experts=4", "moe.dispatcher=alltoall"], 2),  # moe.ep derived from dp
])
def test_dp_derived_from_world_size(world_size, overrides, dp):
    assert validate(cfg_with(*overrides), world_size) == dp


# ---- save / load round trip ---------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [
    [],
    ["output_dir=runs/rt", "model.n_kv_heads=2", "model.ffn_hidden=96", "model.vocab_size=100",
     "model.norm_eps=1e-6", "model.tie_embeddings=true", "parallel.dp=2", "parallel.dp_type=ddp",
     "train.lr=3e-4", "train.min_lr=1e-5", "train.peak_flops=1.5e14", "train.dtype=bf16",
     "train.resume=/ckpt/step_10", "data.source=files", "data.paths=['a/*.txt', b.txt]",
     "data.hf_subset=null", "checkpoint.dir=/tmp/c"],
])
def test_save_then_load_round_trips(tmp_path, overrides):
    cfg = load_config(None, overrides)
    if overrides:  # strings that YAML would misread unless the writer quotes them
        cfg.logging.run_name = "my run: 1 # not a comment"
        cfg.data.hf_dataset = "yes"
        cfg.data.text_field = "null"
    path = tmp_path / "saved.yaml"
    save_config(cfg, path)
    loaded = load_config(path)
    assert loaded == cfg
    assert to_dict(loaded) == to_dict(cfg)
    # The saved file is plain YAML with every section.
    assert set(yaml.safe_load(path.read_text())) == {f.name for f in dataclasses.fields(ExperimentConfig)}


# ---- generated reference ------------------------------------------------------------------------

def schema_docstrings() -> dict[str, dict[str, str]]:
    """{class name: {field: docstring}} read independently from the schema module's source."""
    tree = ast.parse(inspect.getsource(schema))
    out = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        docs = {}
        for i, stmt in enumerate(node.body[:-1]):
            after = node.body[i + 1]
            if (isinstance(stmt, ast.AnnAssign) and isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
                docs[stmt.target.id] = after.value.value
        out[node.name] = docs
    return out


def squash(text: str) -> str:
    return " ".join(text.split())


def test_reference_markdown_lists_every_field_with_its_docstring():
    md = reference_markdown()
    flat = squash(md)
    docs = schema_docstrings()
    hints = typing.get_type_hints(ExperimentConfig)
    n_fields = 0
    for section in SECTIONS:
        cls = hints[section]
        assert f"### `{section}`" in md
        assert squash(inspect.cleandoc(cls.__doc__)) in flat
        pending = [(cls, f"{section}.")]
        while pending:  # nested sections (growth.ops, the elements of growth.stages) have rows too
            owner, prefix = pending.pop()
            for f in dataclasses.fields(owner):
                doc = docs[owner.__name__].get(f.name)
                assert doc, f"{owner.__name__}.{f.name} has no docstring"
                assert f"`{prefix}{f.name}`" in md
                assert squash(doc).replace("|", "\\|") in flat, f"{prefix}{f.name}"
                n_fields += 1
                hint = typing.get_type_hints(owner)[f.name]
                inner = typing.get_args(hint)[0] if typing.get_origin(hint) is list else hint
                if dataclasses.is_dataclass(inner):
                    pending.append((inner, f"{prefix}{f.name}." + ("N." if inner is not hint else "")))
    assert squash(docs["ExperimentConfig"]["output_dir"]) in flat and "output_dir" in md
    # One table row per field, and nothing else in table rows.
    rows = [line for line in md.splitlines() if line.startswith("| `")]
    assert len(rows) == n_fields


def test_reference_markdown_shows_defaults():
    md = reference_markdown()
    assert "| `train.lr` | `0.0003` |" in md
    assert "| `parallel.dp` | `None` |" in md
    assert "| `parallel.dp_type` | `fsdp` |" in md


def test_cli_config_prints_reference(capsys):
    from ppmoe.cli import main
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert "`train.lrr`" not in out and "`train.lr`" in out and "`model.n_kv_heads`" in out


# ---- CLI error reporting -------------------------------------------------------------------------

def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(var, None)
    venv_python = REPO / ".venv" / "bin" / "python"
    python = str(venv_python) if venv_python.exists() else sys.executable
    return subprocess.run([python, "-m", "ppmoe", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_bad_key_exits_2_without_traceback(tmp_path):
    path = write_yaml(tmp_path, {"train": {"lrr": 1e-3}})
    proc = run_cli("train", str(path))
    assert proc.returncode == 2, proc.stderr
    assert "config error" in proc.stderr
    assert "train.lrr" in proc.stderr and "train.lr" in proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout


def test_cli_bad_type_in_override_exits_2(tmp_path):
    path = write_yaml(tmp_path, {"train": {"steps": 3}})
    proc = run_cli("train", str(path), "--set", "train.steps=abc")
    assert proc.returncode == 2, proc.stderr
    assert "config error" in proc.stderr and "train.steps" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_validation_error_exits_2(tmp_path):
    path = write_yaml(tmp_path, {"output_dir": str(tmp_path / "run")})
    proc = run_cli("train", str(path), "--set", "parallel.pp=2")
    assert proc.returncode == 2, proc.stderr
    assert "config error" in proc.stderr and "parallel.pp" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing written before the config is accepted


# ---- malformed input -------------------------------------------------------------------------------

def test_malformed_yaml_is_a_config_error(tmp_path):
    msg = config_error(write_yaml(tmp_path, "train: [unclosed\n"))
    assert str(tmp_path / "cfg.yaml") in msg


def test_malformed_override_value_is_a_config_error():
    assert "train.lr" in config_error(None, ["train.lr=["])


@pytest.mark.parametrize("override", ["train=[]", "train=false", "model=0"])
def test_falsy_non_mapping_section_is_rejected(override):
    assert "mapping" in config_error(None, [override])



def test_renamed_dispatcher_value_is_accepted_with_a_deprecation_message():
    """moe.dispatcher 'pipeline' (Pipeline-MoE) was renamed 'experts_in_tp' (it is not pipeline parallelism);
    configs written before keep working, and say what to write instead."""
    with pytest.warns(FutureWarning, match="moe.dispatcher: 'pipeline' is now called 'experts_in_tp'.*"
                                           "write moe.dispatcher: experts_in_tp"):
        cfg = load_config(None, ["moe.num_experts=4", "moe.dispatcher=pipeline"])
    assert cfg.moe.dispatcher == "experts_in_tp"
    with pytest.raises(ConfigError, match="moe.dispatcher must be one of 'experts_in_tp', 'alltoall', 'local'"):
        load_config(None, ["moe.dispatcher=pipelined"])
