"""generate: continue a prompt token by token (greedy or sampled), with or without the KV cache."""

from __future__ import annotations

import torch

from ..model import GPT
from .forward import check_plain_model
from .moe_records import discarding_moe_records
from .sampling import token_picker
from .steps import cached_step, full_step


def prompt_tensor(model: GPT, prompt_ids: list[int] | torch.Tensor) -> torch.Tensor:
    """The prompt as int64 [P] on the model's device, refused when empty or outside the vocabulary."""
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long)
    if prompt.dim() != 1 or prompt.numel() == 0:
        raise ValueError(f"the prompt must be a non-empty list of token ids, got shape {tuple(prompt.shape)}")
    vocab = model.shape.vocab_size
    if int(prompt.min()) < 0 or int(prompt.max()) >= vocab:
        raise ValueError(f"prompt token ids must lie in [0, {vocab}), got {int(prompt.min())}..{int(prompt.max())}")
    return prompt.to(model.tok_embeddings.weight.device)


def check_length(prompt_len: int, max_new_tokens: int, max_seq_len: int) -> None:
    """Refuse a generation whose sequence would not fit the model's positions (rotary tables and the
    training length end at max_seq_len); the caller decides what to cut, not this function."""
    if max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    if prompt_len + max_new_tokens <= max_seq_len:
        return
    if prompt_len >= max_seq_len:
        raise ValueError(f"the prompt of {prompt_len} tokens leaves no room for new tokens in the model's "
                         f"max_seq_len {max_seq_len}: shorten the prompt")
    raise ValueError(f"a prompt of {prompt_len} tokens + --max-new-tokens {max_new_tokens} = "
                     f"{prompt_len + max_new_tokens} positions exceeds the model's max_seq_len {max_seq_len}: "
                     f"lower --max-new-tokens to at most {max_seq_len - prompt_len} or shorten the prompt")


def generate(model: GPT, prompt_ids: list[int] | torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, eos_id: int | None = None, seed: int = 0, use_cache: bool = True,
             *, vocab_size: int | None = None) -> list[int]:
    """The tokens that follow `prompt_ids` ([P] ids), at most `max_new_tokens` of them, the prompt not included.

    temperature 0: greedy; otherwise sampled from softmax(logits / temperature) over the top_k most likely
    ids (all when None), reproducibly from `seed`. Stops after emitting `eos_id` (which is returned).
    vocab_size: only ids below it are chosen (the tokenizer's, when the model's vocabulary is padded).
    use_cache False recomputes model(all tokens) every step: the reference the cache must match.
    Runs in eval mode without gradients; the model's training flag is restored afterwards.
    A prompt plus max_new_tokens beyond the model's max_seq_len is refused (ValueError).
    """
    check_plain_model(model)
    prompt = prompt_tensor(model, prompt_ids)
    check_length(prompt.numel(), max_new_tokens, model.shape.max_seq_len)
    pick = token_picker(temperature, top_k, seed, vocab_size)
    if max_new_tokens == 0:
        return []
    was_training = model.training
    model.eval()  # also: no aux losses attached, no router jitter
    try:
        with torch.no_grad():
            step = cached_step(model, prompt.numel() + max_new_tokens) if use_cache else full_step(model)
            step = discarding_moe_records(model, step)
            new: list[int] = []
            logits = step(prompt[None])
            while True:
                token = pick(logits)
                new.append(token)
                if token == eos_id or len(new) == max_new_tokens:
                    return new
                logits = step(prompt.new_tensor([[token]]))
    finally:
        model.train(was_training)
