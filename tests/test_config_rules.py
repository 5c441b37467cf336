"""Every config rule's message, once: one row per rule of ppmoe/config/schema.py (the sections' own
check()), validate.py (rules across sections) and layout.py (the world and batch splits).

A row is (overrides, world size, a fragment of the message): the config is loaded from the overrides
and validated for that many processes, and the refusal must contain the fragment, which names the key
and says what it must be or what to change. test_every_rule_has_a_row fails when a rule is added to
those files without a row here. The growth plan's own rules are tested in test_growth_plan.py.
"""

from __future__ import annotations

import ast
import inspect
import traceback
import typing
from pathlib import Path

import pytest

from ppmoe.config import ConfigError, DataConfig, ExperimentConfig, load_config, validate
from ppmoe.config import layout, schema
from ppmoe.config import validate as validate_module
from ppmoe.data import prepare_dataset

PIPELINE = ["model.n_layers=4", "train.global_batch_size=8", "train.micro_batch_size=2"]
ALLTOALL = ["moe.num_experts=4", "moe.dispatcher=alltoall"]
THREE_STAGES = ["growth.stages=[{name: small, share: 0.2}, {name: mid, share: 0.3}, {name: final, share: 0.5}]"]

RULES = [
    # ---- schema.py: ModelConfig.check
    (["model.n_layers=0"], 1, "model.n_layers must be >= 1, got 0"),
    (["model.d_model=0"], 1, "model.d_model must be >= 1, got 0"),
    (["model.n_heads=0"], 1, "model.n_heads must be >= 1, got 0"),
    (["model.vocab_multiple=0"], 1, "model.vocab_multiple must be >= 1, got 0"),
    (["model.n_kv_heads=-2"], 1, "model.n_kv_heads must be >= 1, got -2"),
    (["model.ffn_hidden=0"], 1, "model.ffn_hidden must be >= 1, got 0"),
    (["model.vocab_size=0"], 1, "model.vocab_size must be >= 1, got 0"),
    (["model.d_model=60", "model.n_heads=8"], 1, "model.n_heads=8 must divide model.d_model=60"),
    (["model.n_kv_heads=3"], 1, "model.n_kv_heads=3 must divide model.n_heads=4"),
    (["model.d_model=36"], 1, "head dim model.d_model / model.n_heads = 36 / 4 = 9 must be even for rotary "
                              "embeddings; change one of them"),
    # ---- schema.py: MoEConfig.check
    (["moe.num_experts=-1"], 1, "moe.num_experts must be >= 0, got -1"),
    (["moe.num_experts=2", "moe.top_k=3"], 1, "moe.top_k=3 must be between 1 and moe.num_experts=2"),
    (["moe.num_experts=2", "moe.every=0"], 1, "moe.every must be >= 1, got 0"),
    (["moe.num_experts=2", "moe.capacity_factor=0"], 1, "moe.capacity_factor must be > 0 or null (dropless), got 0.0"),
    # ---- schema.py: PatchConfig.check
    (["patch.size=0"], 1, "patch.size must be >= 1 (1 = token level), got 0"),
    (["patch.fraction=1.0"], 1, "patch.fraction must be in [0, 1) (the token phase needs some tokens), got 1.0"),
    (["patch.token_warmup_steps=-1"], 1, "patch.token_warmup_steps must be >= 0, got -1"),
    # ---- schema.py: ParallelConfig.check
    (["parallel.tp=0"], 1, "parallel.tp must be >= 1, got 0"),
    (["parallel.pp=0"], 1, "parallel.pp must be >= 1, got 0"),
    (["parallel.pp_virtual_stages=0"], 1, "parallel.pp_virtual_stages must be >= 1, got 0"),
    (["parallel.pp_layers=[2]"], 1, "parallel.pp_virtual_stages / pp_layers only apply with parallel.pp > 1; set "
                                    "parallel.pp_virtual_stages: 1 and parallel.pp_layers: null, or raise parallel.pp"),
    ([*PIPELINE, "parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b"], 2,
     "parallel.pp_schedule=interleaved_1f1b needs parallel.pp_virtual_stages >= 2"),
    ([*PIPELINE, "parallel.pp=2", "parallel.pp_virtual_stages=2"], 2,
     "parallel.pp_schedule=1f1b runs one stage per rank: set parallel.pp_virtual_stages: 1 or use interleaved_1f1b"),
    ([*PIPELINE, "parallel.pp=2", "parallel.pp_schedule=zbv"], 2,
     "parallel.pp_schedule=zbv runs exactly two stages per rank (in a V): set parallel.pp_virtual_stages: 2"),
    ([*PIPELINE, "parallel.pp=2", "parallel.pp_layers=[4, 0]"], 2,
     "parallel.pp_layers=[4, 0] must have 2 entries (pp * pp_virtual_stages), each >= 1"),
    # ---- schema.py: TrainConfig.check
    (["train.steps=0"], 1, "train.steps must be >= 1, got 0"),
    (["train.global_batch_size=0"], 1, "train.global_batch_size must be >= 1, got 0"),
    (["train.micro_batch_size=0"], 1, "train.micro_batch_size must be >= 1, got 0"),
    (["train.seq_len=0"], 1, "train.seq_len must be >= 1, got 0"),
    (["train.log_every=0"], 1, "train.log_every must be >= 1, got 0"),
    (["train.nonfinite_max=0"], 1, "train.nonfinite_max must be >= 1, got 0"),
    (["train.val_batches=0"], 1, "train.val_batches must be >= 1, got 0"),
    (["train.warmup_steps=-1"], 1, "train.warmup_steps must be >= 0, got -1"),
    (["train.val_every=-1"], 1, "train.val_every must be >= 0, got -1"),
    (["train.grad_clip=-0.5"], 1, "train.grad_clip must be >= 0, got -0.5"),
    (["train.loss_spike_factor=0.5"], 1, "train.loss_spike_factor must be above 1 (or 0 to disable), got 0.5"),
    (["train.lr=1e-4", "train.min_lr=1e-3"], 1, "train.min_lr=0.001 is above train.lr=0.0001; lower train.min_lr"),
    (["train.resume=''"], 1, "train.resume must be 'auto', 'none' or a checkpoint path"),
    (["train.init_from=''"], 1, "train.init_from must be a checkpoint path or null"),
    (["train.ac_every=-1"], 1, "train.ac_every must be >= 0, got -1"),
    (["train.ac_every=2"], 1, "train.ac_every=2 only applies with train.activation_checkpointing=selective (it "
                              "is none); set train.ac_every: 0 or selective"),
    (["train.dtype=fp32", "train.reduce_dtype=bf16"], 1, "train.reduce_dtype=bf16 applies to bf16 compute; with "
     "train.dtype=fp32 gradients are reduced in fp32: set train.reduce_dtype: fp32, or train.dtype: bf16"),
    # ---- schema.py: DataConfig.check
    (["data.vocab_size=0"], 1, "data.vocab_size must be >= 1, got 0"),
    (["data.shard_tokens=0"], 1, "data.shard_tokens must be >= 1, got 0"),
    (["data.val_fraction=1.0"], 1, "data.val_fraction must be in (0, 1), got 1.0"),
    # ---- schema.py: CheckpointConfig.check
    (["checkpoint.every=-1"], 1, "checkpoint.every must be >= 0, got -1"),
    (["checkpoint.keep=-1"], 1, "checkpoint.keep must be >= 0, got -1"),
    # ---- validate.py
    (["parallel.tp=3"], 3, "model.n_heads=4 is not divisible by parallel.tp=3; choose a tp that divides it"),
    (["model.n_heads=8", "model.n_kv_heads=2", "parallel.tp=4"], 4,
     "model.n_kv_heads=2 is not divisible by parallel.tp=4; choose a tp that divides it"),
    (["model.ffn_hidden=98", "parallel.tp=4"], 4, "model.ffn_hidden=98 is not divisible by parallel.tp=4; choose a tp "
                                                  "that divides it"),
    (["model.vocab_multiple=129", "parallel.tp=2"], 2,
     "model.vocab_multiple=129 must be divisible by parallel.tp=2 so the padded vocabulary splits evenly"),
    ([*PIPELINE, "parallel.pp=4", "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_virtual_stages=2"], 4,
     "model.n_layers=4 is fewer than the 8 pipeline stages; raise model.n_layers or lower parallel.pp"),
    ([*PIPELINE, "parallel.pp=2", "parallel.pp_layers=[3, 2]"], 2,
     "parallel.pp_layers=[3, 2] sums to 5; its entries must sum to model.n_layers=4"),
    ([*PIPELINE, "parallel.pp=2", "parallel.pp_schedule=zbv", "parallel.pp_virtual_stages=2", "train.compile=true"], 2,
     "parallel.pp_schedule=zbv splits each backward into input and weight gradients, which is not supported "
     "through compiled blocks: set train.compile: false"),
    ([*PIPELINE, "parallel.pp=2", "parallel.pp_schedule=zbv", "parallel.pp_virtual_stages=2",
      "train.activation_checkpointing=full"], 2,
     "parallel.pp_schedule=zbv splits each backward in two, and train.activation_checkpointing=full would "
     "recompute each block twice: set train.activation_checkpointing: none"),
    (["moe.num_experts=2", "moe.every=3"], 1, "moe.every=3 must be between 1 and model.n_layers=2"),
    (["moe.num_experts=3", "parallel.tp=2"], 2, "moe.num_experts=3 is not divisible by parallel.tp=2: Pipeline-MoE "
                                                "gives each TP rank whole experts"),
    (["moe.num_experts=2", "moe.expert_kernel=grouped_mm", "moe.expert_hidden=66", "train.dtype=fp32"], 1,
     "moe.expert_kernel=grouped_mm needs model.d_model (64) and the expert hidden size (66) divisible by 4 "
     "(16-byte rows in train.dtype=fp32); use 'auto' or 'padded_bmm'"),
    (["moe.num_experts=2", "moe.expert_kernel=grouped_mm", "moe.expert_hidden=68"], 1,
     "moe.expert_kernel=grouped_mm needs model.d_model (64) and the expert hidden size (68) divisible by 8 "
     "(16-byte rows in train.dtype=auto); use 'auto' or 'padded_bmm'"),
    (["moe.num_experts=2", "moe.shared_expert_hidden=3", "parallel.tp=2"], 2,
     "moe.shared_expert_hidden=3 is not divisible by parallel.tp=2; make it a multiple of parallel.tp"),
    ([*ALLTOALL, "parallel.tp=2"], 2, "moe.dispatcher=alltoall runs at parallel.tp=1"),
    ([*ALLTOALL, "moe.ep=4"], 2, "moe.ep=4 must equal the data-parallel size 2 (or be null)"),
    (ALLTOALL, 8, "moe.num_experts=4 is not divisible by the expert-parallel size (= data-parallel size) 8; use a "
                  "multiple of it"),
    (["parallel.sequence_parallel=true", "parallel.tp=4", "train.seq_len=18"], 4,
     "train.seq_len=18 is not divisible by parallel.tp=4: parallel.sequence_parallel splits every sequence over "
     "the TP ranks"),
    (["parallel.sequence_parallel=true", "parallel.tp=2", "moe.num_experts=2", "moe.dispatcher=local"], 2,
     "moe.dispatcher=local has no sequence-parallel form"),
    (["train.warmup_steps=500"], 1, "train.warmup_steps=500 is larger than train.steps=100; lower train.warmup_steps"),
    ([*THREE_STAGES, "growth.stages.0.train={micro_batch_size: 3}"], 1,
     "growth stage 0 ('small'; the top-level config with growth.stages.0 overrides): "
     "train.global_batch_size=8 must be divisible by train.micro_batch_size * dp = 3 * 1"),
    # ---- layout.py
    (["parallel.tp=2"], 3, "world size 3 is not divisible by parallel.tp * parallel.pp = 2 * 1; launch a multiple "
                           "of 2 processes or change tp/pp"),
    (["parallel.dp=0"], 1, "parallel.dp must be >= 1, got 0"),
    (["parallel.tp=2", "parallel.dp=3"], 4, "parallel.tp * parallel.pp * parallel.dp = 2 * 1 * 3 = 6, but the world "
                                            "size is 4"),
    (["train.global_batch_size=6"], 1, "train.global_batch_size=6 must be divisible by train.micro_batch_size * dp "
                                       "= 4 * 1; change one of them"),
    ([*PIPELINE, "train.micro_batch_size=4", "parallel.pp=4"], 4,
     "the pipeline gets 2 micro-batches per step (global_batch_size / (micro_batch_size * dp)); it needs at least "
     "parallel.pp=4: lower train.micro_batch_size or raise train.global_batch_size"),
    ([*PIPELINE, "train.global_batch_size=6", "parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b",
      "parallel.pp_virtual_stages=2"], 2, "it needs at least parallel.pp=2 and a multiple of it for interleaved_1f1b"),
    ([*PIPELINE, "model.n_layers=8", "parallel.pp=4", "parallel.pp_schedule=dualpipev", "parallel.pp_virtual_stages=2"],
     4, "the pipeline gets 4 micro-batches per step (global_batch_size / (micro_batch_size * dp)); dualpipev needs "
        "at least one per stage, 2 * parallel.pp = 8: lower train.micro_batch_size"),
    # ---- a growth stage's own section: the key carries the stage's prefix
    ([*THREE_STAGES, "growth.stages.1.model.n_heads=3"], 1,
     "growth.stages.1.model.n_heads=3 must divide growth.stages.1.model.d_model=64"),
    ([*THREE_STAGES, "growth.stages.0.parallel.tp=0"], 1, "growth.stages.0.parallel.tp must be >= 1, got 0"),
    # ---- growth_rules.py: what may change between stages
    ([*THREE_STAGES, "moe.num_experts=4", "moe.shared_expert_hidden=16", "moe.shared_expert_gate=true",
      "growth.stages.0.moe={shared_expert_gate: false}"], 1,
     "moe.shared_expert_gate=True differs from the previous stage's False"),
]


def refusal(overrides: list[str], world_size: int) -> ConfigError:
    """The ConfigError that loading `overrides` and validating them for `world_size` processes raises."""
    with pytest.raises(ConfigError) as info:
        validate(load_config(None, overrides), world_size)
    return info.value


@pytest.mark.parametrize("overrides, world_size, fragment", RULES, ids=[" ".join(row[0])[-60:] for row in RULES])
def test_rule_message(overrides, world_size, fragment):
    assert fragment in str(refusal(overrides, world_size))


def test_the_defaults_break_no_rule():
    """Each row breaks its rule on top of the defaults, so the defaults must pass every rule."""
    assert validate(load_config(None, []), 1) == 1
    assert validate(load_config(None, THREE_STAGES), 1) == 1


def raise_site(error: BaseException) -> tuple[str, int]:
    """(file name, line) where `error` was raised."""
    frame = traceback.extract_tb(error.__traceback__)[-1]
    return Path(frame.filename).name, frame.lineno


def config_error_raises(module) -> set[tuple[str, range]]:
    """Every `raise ConfigError(...)` statement in `module`'s source: (file name, its lines)."""
    path = Path(inspect.getsourcefile(module))
    sites = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call)
                and getattr(node.exc.func, "id", None) == "ConfigError"):
            sites.add((path.name, range(node.lineno, node.end_lineno + 1)))
    return sites


def at_least_keys() -> set[str]:
    """'section.key' for every key a section checks with require_at_least (one rule per key)."""
    sections = {cls.__name__: name for name, cls in typing.get_type_hints(ExperimentConfig).items()}
    keys = set()
    for cls in ast.parse(inspect.getsource(schema)).body:
        if not isinstance(cls, ast.ClassDef):
            continue
        for node in ast.walk(cls):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "require_at_least":
                keys |= {f"{sections[cls.name]}.{arg.value}" for arg in node.args[3:]}
    return keys


def test_every_rule_has_a_row():
    raised = {raise_site(refusal(overrides, world_size)) for overrides, world_size, _ in RULES}
    for module in (schema, validate_module, layout):
        for name, lines in config_error_raises(module):
            assert any(file == name and line in lines for file, line in raised), \
                f"{name}:{lines.start} raises a ConfigError that no row of RULES reaches"
    fragments = " | ".join(fragment for *_, fragment in RULES)
    for key in at_least_keys():
        assert f"{key} must be >= " in fragments, f"{key}'s range has no row in RULES"


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_prepare_refuses_what_training_refuses(tmp_path, fraction):
    """`ppmoe prepare` runs the data section's own check, so it says what training says, before writing."""
    from_training = refusal([f"data.val_fraction={fraction}"], 1)
    data = DataConfig(dataset_dir=str(tmp_path / "out"), source="files", paths=[str(tmp_path / "*.txt")],
                      val_fraction=fraction)
    with pytest.raises(ConfigError) as from_prepare:
        prepare_dataset(data, log=lambda *_: None)
    assert str(from_prepare.value) == str(from_training) == f"data.val_fraction must be in (0, 1), got {fraction}"
    assert not (tmp_path / "out").exists()


def test_a_config_built_in_code_is_checked_by_validate():
    """Dataclasses built in code skip the loader; validate still runs every section's check."""
    cfg = ExperimentConfig()
    cfg.model.n_heads = 0
    with pytest.raises(ConfigError, match="model.n_heads must be >= 1, got 0"):
        validate(cfg, 1)
