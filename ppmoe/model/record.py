"""model.json: what a checkpoint's weights are, so a tool can read them without the run's config.

Every checkpoint the trainer writes holds one (beside the DCP files): the resolved model shape, the
unpadded vocabulary, the tokenizer's end-of-document id, the stage the weights were trained in and
its patch size. `ppmoe import` writes one with `model_only: true` (weights, no optimizer or trainer
state: a start for train.init_from, not a run to resume). Checkpoints of an older ppmoe have none.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from ..moe.shape import MoEShape
from .gpt import GPTShape

MODEL_RECORD = "model.json"
RECORD_VERSION = 1


@dataclass(frozen=True)
class ModelRecord:
    """shape: the model's sizes (vocab_size padded); vocab_size: the rows that are real tokens (the rest
    pad the embedding to model.vocab_multiple); eos_id: the tokenizer's end-of-document id (None when
    unknown); stage / patch_size: the training stage the weights come from (patch_size > 1: trained to
    read patches of that many tokens); model_only: no optimizer or trainer state."""

    shape: GPTShape
    vocab_size: int
    eos_id: int | None = None
    stage: str = "main"
    patch_size: int = 1
    model_only: bool = False

    def to_json(self) -> str:
        fields = dataclasses.asdict(self)
        return json.dumps({"version": RECORD_VERSION, **fields}, indent=2)

    @staticmethod
    def from_json(text: str) -> "ModelRecord":
        fields = json.loads(text)
        fields.pop("version", None)
        shape = dict(fields.pop("shape"))
        moe = shape.pop("moe")
        shape = GPTShape(**shape, moe=MoEShape(**moe) if moe else None)
        return ModelRecord(shape=shape, **fields)


def write_model_record(directory: Path, record: ModelRecord) -> Path:
    path = Path(directory) / MODEL_RECORD
    path.write_text(record.to_json() + "\n")
    return path


def read_model_record(directory: Path) -> ModelRecord | None:
    """The record of the checkpoint in `directory`, None when it has none (an older ppmoe wrote it)."""
    path = Path(directory) / MODEL_RECORD
    return ModelRecord.from_json(path.read_text()) if path.is_file() else None


# Settings that change what the weights compute (the rest: init, losses, kernels, the longest sequence
# trained on, are free to differ between a checkpoint and the model it initialises).
MODEL_FIELDS = {"n_layers": "model.n_layers", "d_model": "model.d_model", "n_heads": "model.n_heads",
                "n_kv_heads": "model.n_kv_heads", "ffn_hidden": "model.ffn_hidden",
                "vocab_size": "model.vocab_size (padded)", "rope_theta": "model.rope_theta",
                "norm_eps": "model.norm_eps", "tie_embeddings": "model.tie_embeddings"}
MOE_FIELDS = {"num_experts": "moe.num_experts", "top_k": "moe.top_k", "every": "moe.every",
              "expert_hidden": "moe.expert_hidden", "shared_expert_hidden": "moe.shared_expert_hidden",
              "shared_expert_gate": "moe.shared_expert_gate", "normalize_topk": "moe.normalize_topk"}


def shape_differences(have: GPTShape, want: GPTShape) -> list[str]:
    """'key: have -> want' for each setting in which two shapes compute differently ([] when none)."""
    pairs = [(key, getattr(have, field), getattr(want, field)) for field, key in MODEL_FIELDS.items()]
    if have.moe is None or want.moe is None:
        pairs.append(("moe.num_experts", have.moe.num_experts if have.moe else 0,
                      want.moe.num_experts if want.moe else 0))
    else:
        pairs += [(key, getattr(have.moe, field), getattr(want.moe, field)) for field, key in MOE_FIELDS.items()]
    return [f"{key}: {a} -> {b}" for key, a, b in pairs if a != b]
