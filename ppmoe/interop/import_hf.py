"""`ppmoe import`: a transformers Llama / Mixtral / Qwen2-MoE directory -> a model-only ppmoe checkpoint
(DCP, model.json with model_only: true, the model's tokenizer.json) that a run starts from with
train.init_from, at any parallel layout. The config describes the model; every setting in which it and
the transformers model would compute differently is named, with the value to set."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch.distributed.checkpoint as dcp

from ..config import ExperimentConfig
from ..model import GPTShape, model_shape
from ..model.build import meta_model
from ..model.record import ModelRecord, shape_differences, write_model_record
from ..moe.shape import MoEShape
from ..storage.manifest import build_manifest, checkpoint_files, manifest_entry, write_manifest
from .architectures import ARCHITECTURES
from .output_dir import fresh_directory
from .safetensors_files import read_safetensors
from .single_process import one_process_dcp
from .tokenizer_files import TOKENIZER_FILE
from .weights import ImportRefused, from_hf


def read_hf_config(hf_dir: Path) -> dict:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise ImportRefused(f"{hf_dir} has no config.json: point at a transformers model directory")
    config = json.loads(path.read_text())
    if config.get("model_type") not in ARCHITECTURES:
        raise ImportRefused(f"{hf_dir} is a {config.get('model_type')!r} model; ppmoe imports "
                            f"{', '.join(ARCHITECTURES)}")
    return config


def rope_theta(config: dict) -> float:
    """rope_theta of either spelling; ImportRefused for a scaled rotary (llama3, yarn, ...)."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise ImportRefused(f"rotary scaling {kind!r}: ppmoe's rotary embedding is the plain one (rope_type default)")
    return float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))


def unsupported_settings(config: dict) -> list[str]:
    """Settings of the transformers model that ppmoe's model does not have."""
    problems = []
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {config['hidden_act']!r} (ppmoe's FFN is SwiGLU)")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            problems.append(f"{key}: true (ppmoe has no biases)")
    if config.get("use_sliding_window") or (config.get("model_type") == "mixtral" and config.get("sliding_window")):
        problems.append("sliding-window attention")
    if config.get("mlp_only_layers"):
        problems.append("mlp_only_layers (ppmoe places MoE layers by moe.every only)")
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if head_dim * config["num_attention_heads"] != config["hidden_size"]:
        problems.append(f"head_dim {head_dim} x {config['num_attention_heads']} heads != hidden_size "
                        f"{config['hidden_size']}")
    return problems


def shape_from_hf(config: dict, max_seq_len: int) -> GPTShape:
    """The ppmoe shape that computes what the transformers model computes."""
    problems = unsupported_settings(config)
    if problems:
        raise ImportRefused(f"the transformers model has {'; '.join(problems)}: ppmoe cannot compute it exactly")
    arch = config["model_type"]
    renormalised = arch == "mixtral" or bool(config.get("norm_topk_prob", False))
    if arch != "llama" and config["num_experts_per_tok"] == 1 and renormalised:
        raise ImportRefused("top-1 routing renormalised to a weight of 1: ppmoe weights a token's one expert by its "
                            "softmax probability (a Qwen2-MoE with norm_topk_prob: false matches)")
    moe = None
    if arch == "mixtral":
        moe = MoEShape(num_experts=config["num_local_experts"], top_k=config["num_experts_per_tok"],
                       expert_hidden=config["intermediate_size"], normalize_topk=True)
    elif arch == "qwen2_moe":
        shared = config.get("shared_expert_intermediate_size", 0)
        moe = MoEShape(num_experts=config["num_experts"], top_k=config["num_experts_per_tok"],
                       every=config.get("decoder_sparse_step", 1), expert_hidden=config["moe_intermediate_size"],
                       shared_expert_hidden=shared, shared_expert_gate=shared > 0,
                       normalize_topk=bool(config.get("norm_topk_prob", False)))
    heads = config["num_attention_heads"]
    return GPTShape(n_layers=config["num_hidden_layers"], d_model=config["hidden_size"], n_heads=heads,
                    n_kv_heads=config.get("num_key_value_heads") or heads,
                    ffn_hidden=config["intermediate_size"] if arch != "mixtral" else 0,
                    vocab_size=config["vocab_size"], max_seq_len=max_seq_len, rope_theta=rope_theta(config),
                    norm_eps=config.get("rms_norm_eps", 1e-6), tie_embeddings=bool(config.get("tie_word_embeddings")),
                    moe=moe)


def comparable(shape: GPTShape, like: GPTShape) -> GPTShape:
    """`shape` with what the transformers model does not decide taken from `like`: a Mixtral has no dense
    FFN; ppmoe never renormalises top-1 routing, whatever moe.normalize_topk says."""
    if like.moe is not None and shape.moe is not None:
        if shape.moe.every == 1:
            shape = dataclasses.replace(shape, ffn_hidden=like.ffn_hidden)
        if shape.moe.top_k == 1:
            shape = dataclasses.replace(shape, moe=dataclasses.replace(shape.moe, normalize_topk=like.moe.normalize_topk))
    return shape


def check_config(cfg: ExperimentConfig, hf: GPTShape) -> GPTShape:
    """The config's model shape, refused unless it computes what the transformers model does."""
    ours = model_shape(cfg, hf.vocab_size)
    if ours.vocab_size != hf.vocab_size:
        raise ImportRefused(f"the config's vocabulary is {ours.vocab_size} rows (model.vocab_size padded to "
                            f"model.vocab_multiple={cfg.model.vocab_multiple}), the transformers model's "
                            f"{hf.vocab_size}: set model.vocab_size: {hf.vocab_size} and a model.vocab_multiple that "
                            f"divides it (padding rows would take part in the softmax)")
    differences = shape_differences(comparable(hf, ours), ours)
    if differences:
        raise ImportRefused(f"the config does not describe the transformers model: {'; '.join(differences)} "
                            f"(transformers -> config); set the config to the transformers values")
    return ours


def import_model(hf_dir: Path, cfg: ExperimentConfig, out: Path) -> ModelRecord:
    """Write the transformers model in `hf_dir` as a model-only ppmoe checkpoint `out` (a new directory)."""
    config = read_hf_config(hf_dir)
    shape = check_config(cfg, shape_from_hf(config, cfg.train.seq_len))
    template = meta_model(shape).state_dict()
    state = from_hf(read_safetensors(hf_dir), shape, config["model_type"], template)
    eos = config.get("eos_token_id")
    record = ModelRecord(shape, config["vocab_size"], eos[0] if isinstance(eos, list) else eos, "imported", 1,
                         model_only=True)
    with fresh_directory(out) as tmp:
        with one_process_dcp():
            dcp.save({"model": state}, checkpoint_id=str(tmp), no_dist=True)
        write_model_record(tmp, record)
        if (hf_dir / TOKENIZER_FILE).is_file():
            shutil.copyfile(hf_dir / TOKENIZER_FILE, tmp / TOKENIZER_FILE)
        write_manifest(tmp, build_manifest(0, 1, {name: manifest_entry(tmp / name) for name in checkpoint_files(tmp)}))
    return record
