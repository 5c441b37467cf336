"""Which transformers architecture represents a ppmoe model exactly, and its config.json.

The mathematics is shared: pre-norm RMSNorm blocks, half-split rotary (transformers' rotate_half), SwiGLU,
softmax router -> top-k -> optional renormalisation. What decides the architecture:
- llama: a dense model.
- mixtral: MoE in every layer, no shared expert, and renormalised top-k with k >= 2 (Mixtral always
  renormalises; ppmoe never renormalises top-1, whose weight is the softmax probability).
- qwen2_moe: MoE every n-th layer (decoder_sparse_step = moe.every; both count layers every-1,
  2*every-1, ...), renormalised or not (norm_topk_prob), a shared expert only with Qwen2-MoE's sigmoid
  gate (moe.shared_expert_gate). Without a shared expert its size is 0, which adds exactly 0. Attention
  biases are written as zeros (qkv_bias: true), the form every transformers version and vLLM read.
Anything else is refused with the reasons: nothing is exported approximately without saying so.
"""

from __future__ import annotations

from ..errors import PpmoeError
from ..model import GPTShape

ARCHITECTURES = ("llama", "mixtral", "qwen2_moe")
CLASS_NAMES = {"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}


class ExportRefused(PpmoeError):
    """No transformers architecture (or not the one asked for) computes what the model computes."""

    exit_code = 2


def reasons_against(arch: str, shape: GPTShape) -> list[str]:
    """Why `arch` cannot represent `shape` exactly ([] when it can)."""
    moe = shape.moe
    if arch == "llama":
        return [f"the model has MoE layers ({moe.num_experts} experts): Llama is dense"] if moe else []
    if moe is None:
        return [f"the model is dense: use llama, not {arch}"]
    reasons = []
    if arch == "mixtral":
        if moe.every != 1:
            reasons.append(f"moe.every={moe.every}: Mixtral has MoE in every layer (qwen2_moe has dense layers between)")
        if moe.shared_expert_hidden:
            reasons.append("a shared expert: Mixtral has none")
        if moe.top_k == 1:
            reasons.append("top-1 routing: ppmoe weights the one expert by its softmax probability, Mixtral "
                           "renormalises it to 1 (qwen2_moe with norm_topk_prob: false matches)")
        elif not moe.normalize_topk:
            reasons.append("moe.normalize_topk=false: Mixtral always renormalises the top-k weights")
        return reasons
    if moe.shared_expert_hidden and not moe.shared_expert_gate:
        reasons.append("an ungated shared expert: Qwen2-MoE scales its shared expert by a learned sigmoid gate; "
                       "train with moe.shared_expert_gate: true to export to it")
    return reasons


def choose_architecture(shape: GPTShape, requested: str = "auto") -> str:
    """`requested` when it represents the model exactly; for 'auto' the first that does of llama, mixtral,
    qwen2_moe. ExportRefused with every reason otherwise."""
    if requested != "auto":
        if requested not in ARCHITECTURES:
            raise ExportRefused(f"--arch {requested}: choose auto or one of {', '.join(ARCHITECTURES)}")
        reasons = reasons_against(requested, shape)
        if reasons:
            raise ExportRefused(f"cannot export to {requested} exactly: {'; '.join(reasons)}")
        return requested
    candidates = ["llama"] if shape.moe is None else ["mixtral", "qwen2_moe"]
    for arch in candidates:
        if not reasons_against(arch, shape):
            return arch
    why = "; ".join(f"{arch}: {'; '.join(reasons_against(arch, shape))}" for arch in candidates)
    raise ExportRefused(f"no transformers architecture represents this model exactly ({why})")


def hf_config(arch: str, shape: GPTShape, vocab_size: int, eos_id: int | None) -> dict:
    """config.json of the transformers model (vocab_size: the unpadded vocabulary)."""
    head_dim = shape.d_model // shape.n_heads
    config = {
        "architectures": [CLASS_NAMES[arch]], "model_type": arch,
        "vocab_size": vocab_size, "hidden_size": shape.d_model, "num_hidden_layers": shape.n_layers,
        "num_attention_heads": shape.n_heads, "num_key_value_heads": shape.n_kv_heads, "head_dim": head_dim,
        "intermediate_size": shape.ffn_hidden, "hidden_act": "silu", "rms_norm_eps": shape.norm_eps,
        "max_position_embeddings": shape.max_seq_len, "tie_word_embeddings": shape.tie_embeddings,
        # both spellings: rope_parameters (transformers 5) and rope_theta (4.x, vLLM)
        "rope_theta": shape.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": shape.rope_theta},
        "attention_dropout": 0.0, "initializer_range": shape.init_std, "torch_dtype": "float32",
        "bos_token_id": None, "eos_token_id": eos_id, "pad_token_id": None, "use_cache": True,
    }
    moe = shape.moe
    if arch == "llama":
        config.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    elif arch == "mixtral":
        config.update(intermediate_size=moe.expert_hidden, num_local_experts=moe.num_experts,
                      num_experts_per_tok=moe.top_k, router_jitter_noise=0.0, sliding_window=None,
                      output_router_logits=False, router_aux_loss_coef=moe.aux_loss_coef)
    else:
        config.update(moe_intermediate_size=moe.expert_hidden, num_experts=moe.num_experts,
                      num_experts_per_tok=moe.top_k, decoder_sparse_step=moe.every, mlp_only_layers=[],
                      norm_topk_prob=moe.normalize_topk and moe.top_k > 1,
                      shared_expert_intermediate_size=moe.shared_expert_hidden, qkv_bias=True,
                      use_sliding_window=False, sliding_window=None, max_window_layers=shape.n_layers,
                      output_router_logits=False, router_aux_loss_coef=moe.aux_loss_coef)
    return config
