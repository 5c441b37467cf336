"""ppmoe state dict <-> transformers tensors (the hub layout: one tensor per expert, [out, in] Linear
weights), for llama, mixtral and qwen2_moe (see architectures.py).

ppmoe stores experts stacked, w1/w3 [E, d, h] (input-major, for grouped GEMMs) and w2 [E, h, d];
transformers stores expert e's gate/up as [h, d] and down as [d, h]: the transposes of w*[e]. Rotary is
half-split in both, so q/k need no permutation. The vocabulary is padded in ppmoe (to
model.vocab_multiple); the padding rows are dropped on export and must not be needed on import.
"""

from __future__ import annotations

import torch

from ..errors import PpmoeError
from ..model import GPTShape

# Inside a layer: ppmoe name -> transformers name (under model.layers.{i}.), the same in every architecture.
ATTENTION_NAMES = {
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
}
DENSE_NAMES = {"feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w3.weight": "mlp.up_proj.weight",
               "feed_forward.w2.weight": "mlp.down_proj.weight"}
MOE_BLOCK = {"mixtral": "block_sparse_moe", "qwen2_moe": "mlp"}
EXPERT_NAMES = {"mixtral": {"w1": "w1", "w3": "w3", "w2": "w2"},
                "qwen2_moe": {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}}
SHARED_NAMES = {"w1.weight": "gate_proj.weight", "w3.weight": "up_proj.weight", "w2.weight": "down_proj.weight"}
QKV = ("q_proj", "k_proj", "v_proj")


class ImportRefused(PpmoeError):
    """The transformers weights do not fit the ppmoe model, or compute something it cannot."""

    exit_code = 2


def own(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor with its own storage (safetensors refuses views and shared storage)."""
    return t.detach().contiguous().clone()


def layer_names(arch: str, shape: GPTShape, index: int) -> dict[str, str]:
    """ppmoe -> transformers names of layer `index`'s tensors that map one to one (not the experts)."""
    names = dict(ATTENTION_NAMES)
    if not shape.is_moe_layer(index):
        names.update(DENSE_NAMES)
    else:
        block = MOE_BLOCK[arch]
        names["feed_forward.router.gate.weight"] = f"{block}.gate.weight"
        if shape.moe.shared_expert_hidden:
            names.update({f"feed_forward.shared_expert.{k}": f"{block}.shared_expert.{v}"
                          for k, v in SHARED_NAMES.items()})
            names["feed_forward.shared_expert.gate.weight"] = f"{block}.shared_expert_gate.weight"
    return {k: f"model.layers.{index}.{v}" for k, v in names.items()}


def to_hf(state: dict[str, torch.Tensor], shape: GPTShape, arch: str, vocab_size: int) -> dict[str, torch.Tensor]:
    """ppmoe state dict (full tensors) -> transformers tensors; the first `vocab_size` rows of the
    embedding and output are kept."""
    out = {"model.embed_tokens.weight": own(state["tok_embeddings.weight"][:vocab_size]),
           "model.norm.weight": own(state["norm.weight"])}
    if not shape.tie_embeddings:
        out["lm_head.weight"] = own(state["output.weight"][:vocab_size])
    d = shape.d_model
    for i in range(shape.n_layers):
        prefix = f"layers.{i}."
        for ours, theirs in layer_names(arch, shape, i).items():
            out[theirs] = own(state[prefix + ours])
        if arch == "qwen2_moe":  # zero q/k/v biases: the hub form of Qwen2-MoE (see architectures.py)
            for proj in QKV:
                rows = state[f"{prefix}attention.w{proj[0]}.weight"].shape[0]
                out[f"model.layers.{i}.self_attn.{proj}.bias"] = torch.zeros(rows)
        if not shape.is_moe_layer(i):
            continue
        block = f"model.layers.{i}.{MOE_BLOCK[arch]}"
        for ours, theirs in EXPERT_NAMES[arch].items():
            stacked = state[f"{prefix}feed_forward.experts.{ours}"]  # [E, d, h] or [E, h, d]
            for e in range(shape.moe.num_experts):
                out[f"{block}.experts.{e}.{theirs}.weight"] = own(stacked[e].t())
        if arch == "qwen2_moe" and not shape.moe.shared_expert_hidden:  # a shared expert of size 0 adds 0
            out.update({f"{block}.shared_expert.gate_proj.weight": torch.zeros(0, d),
                        f"{block}.shared_expert.up_proj.weight": torch.zeros(0, d),
                        f"{block}.shared_expert.down_proj.weight": torch.zeros(d, 0),
                        f"{block}.shared_expert_gate.weight": torch.zeros(1, d)})
    return out


class TensorSource:
    """Takes named tensors out of a transformers checkpoint, checking shapes; remembers what was used, so
    that leftovers (weights the ppmoe model has no place for) can be refused."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors, self.used = tensors, set()

    def take(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in self.tensors:
            raise ImportRefused(f"the transformers checkpoint has no tensor {name} (needed for a model of this "
                                f"config): check that the config matches the model")
        t = self.tensors[name]
        if tuple(t.shape) != tuple(shape):
            raise ImportRefused(f"{name} is {tuple(t.shape)} in the transformers checkpoint, the config's model wants "
                                f"{tuple(shape)}: check that the config matches the model")
        self.used.add(name)
        return t.float()

    def take_zero(self, name: str) -> None:
        """A tensor ppmoe has no place for, accepted only when it is all zeros (it then adds nothing)."""
        if name in self.tensors:
            self.used.add(name)
            if torch.count_nonzero(self.tensors[name]):
                raise ImportRefused(f"{name} is not zero: ppmoe's model has no such weight (attention without "
                                    f"biases, a shared expert only when moe.shared_expert_hidden > 0), so it cannot "
                                    f"compute what this model computes")

    def leftovers(self) -> list[str]:
        return sorted(set(self.tensors) - self.used)


def from_hf(tensors: dict[str, torch.Tensor], shape: GPTShape, arch: str,
            template: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers tensors -> ppmoe state dict with `template`'s keys and shapes (the config's model).
    The transformers vocabulary must equal the model's padded one (extra rows could not be made to stay
    out of the softmax). ImportRefused names what does not fit."""
    src = TensorSource(tensors)
    state = {"tok_embeddings.weight": src.take("model.embed_tokens.weight", template["tok_embeddings.weight"].shape),
             "norm.weight": src.take("model.norm.weight", template["norm.weight"].shape)}
    if shape.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    else:
        state["output.weight"] = src.take("lm_head.weight", template["output.weight"].shape)
    for i in range(shape.n_layers):
        prefix = f"layers.{i}."
        for ours, theirs in layer_names(arch, shape, i).items():
            state[prefix + ours] = src.take(theirs, template[prefix + ours].shape)
        for proj in QKV:
            src.take_zero(f"model.layers.{i}.self_attn.{proj}.bias")
        if not shape.is_moe_layer(i):
            continue
        block = f"model.layers.{i}.{MOE_BLOCK[arch]}"
        for ours, theirs in EXPERT_NAMES[arch].items():
            key = f"{prefix}feed_forward.experts.{ours}"
            per_expert = template[key].shape[1:]
            state[key] = torch.stack([src.take(f"{block}.experts.{e}.{theirs}.weight", per_expert[::-1]).t()
                                      for e in range(shape.moe.num_experts)])
        if arch == "qwen2_moe" and not shape.moe.shared_expert_hidden:
            for name in ("gate_proj", "up_proj", "down_proj"):
                src.take_zero(f"{block}.shared_expert.{name}.weight")
            src.used.add(f"{block}.shared_expert_gate.weight")  # it gates an expert of size 0: any value adds 0
    leftovers = src.leftovers()
    if shape.tie_embeddings and leftovers == ["lm_head.weight"]:
        if torch.equal(tensors["lm_head.weight"].float(), state["tok_embeddings.weight"]):
            leftovers = []
    if leftovers:
        raise ImportRefused(f"the transformers checkpoint has {len(leftovers)} tensors the config's model has no "
                            f"place for (first: {', '.join(leftovers[:3])}): check that the config matches the model")
    missing = set(template) - set(state)
    if missing:
        raise ImportRefused(f"no transformers tensor maps to {sorted(missing)[:3]}")
    return {k: v.contiguous() for k, v in state.items()}
