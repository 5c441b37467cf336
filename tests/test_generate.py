"""Tests of ppmoe.inference: the KV-cached forward is the model's forward (fp32: atol 1e-5, rtol 1e-5 on
the logits), cached and uncached greedy generation choose the same ids, chunked prefills, sampling
(seeded, top-k, eos, the vocabulary limit) and the refusals. Dense (tied; untied GQA) and MoE (top-2 in
every layer; every other layer with a gated shared expert) models, tiny enough for a few seconds on 2 cores."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ppmoe.inference import KVCache, forward_with_cache, generate, serving_shape, token_picker
from ppmoe.model import GPT, GPTShape, build_model
from ppmoe.moe import MoEFeedForward, MoEShape

torch.set_num_threads(1)

VOCAB, SEQ = 96, 48
TOL = dict(rtol=1e-5, atol=1e-5)  # fp32; the cached and full forwards differ only in summation order
BASE = GPTShape(n_layers=2, d_model=32, n_heads=4, n_kv_heads=4, ffn_hidden=64, vocab_size=VOCAB, max_seq_len=SEQ,
                init_std=0.1)
SHAPES = {
    "dense_tied": dataclasses.replace(BASE, tie_embeddings=True),
    "dense_gqa_untied": dataclasses.replace(BASE, n_heads=8, n_kv_heads=2),
    "moe_top2_every_layer": dataclasses.replace(
        BASE, n_kv_heads=2, moe=MoEShape(num_experts=4, top_k=2, expert_hidden=32)),
    "moe_every_other_gated_shared": dataclasses.replace(
        BASE, n_layers=4, moe=MoEShape(num_experts=4, top_k=2, every=2, expert_hidden=32, expert_kernel="loop",
                                       shared_expert_hidden=48, shared_expert_gate=True)),
}


def make_model(shape: GPTShape, seed: int = 0) -> GPT:
    """Every parameter perturbed (norm gains too), so no layer passes by being an identity; residual
    output projections not scaled down, so the blocks outweigh the embedding (a tied model otherwise
    repeats its last token); router gates large enough (std 0.3, logits std ~1.7) that tokens spread
    over the experts decisively."""
    model = build_model(shape, seed)
    g = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g))
        for name, p in model.named_parameters():
            if name.endswith(("wo.weight", "w2.weight", "experts.w2")):
                p.mul_(2 * shape.n_layers)
        for layer in model.modules():
            if isinstance(layer, MoEFeedForward):
                layer.router.gate.weight.copy_(0.3 * torch.randn(layer.router.gate.weight.shape, generator=g))
    return model.eval()


def tokens(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def experts_used(model: GPT) -> list[int]:
    """Per MoE layer, how many experts got tokens in the model's last forward."""
    return [int((layer.stats.pending[-1][2] > 0).sum()) for layer in model.modules()
            if isinstance(layer, MoEFeedForward)]


@pytest.mark.parametrize("name", SHAPES)
def test_cached_forward_equals_full_forward_at_every_position(name):
    model = make_model(SHAPES[name])
    x = tokens(2, SEQ)
    with torch.no_grad():
        full = model(x)
        if SHAPES[name].moe is not None:
            assert min(experts_used(model)) == 4  # the routing is diverse: every expert gets tokens
        cache = KVCache.for_model(model, batch=2)
        parts = [forward_with_cache(model, x[:, :10], cache)]  # prefill
        parts += [forward_with_cache(model, x[:, t:t + 1], cache) for t in range(10, SEQ)]  # decode
    assert cache.length == SEQ
    torch.testing.assert_close(torch.cat(parts, dim=1), full, **TOL)


@pytest.mark.parametrize("name", SHAPES)
def test_greedy_generation_with_and_without_cache_chooses_the_same_ids(name):
    # seed 1: a random model whose greedy continuation is not one token repeated (seed 0's tied one is)
    model = make_model(SHAPES[name], seed=1)
    prompt = tokens(1, 8, seed=1)[0]
    cached = generate(model, prompt, 20, temperature=0, use_cache=True)
    reference = generate(model, prompt.tolist(), 20, temperature=0, use_cache=False)
    assert cached == reference
    assert len(cached) == 20 and len(set(cached)) > 1
    # Random models soon settle on a few tokens under greedy decoding; sampling keeps the sequence varied
    # (and a 1e-6 logit difference flips a draw about as rarely as an argmax).
    sampled = generate(model, prompt, 20, temperature=1.0, seed=5, use_cache=True)
    assert generate(model, prompt, 20, temperature=1.0, seed=5, use_cache=False) == sampled
    assert len(set(sampled)) > 10


@pytest.mark.parametrize("name", ["dense_gqa_untied", "moe_every_other_gated_shared"])
def test_chunked_prefill_equals_one_prefill(name):
    """A chunk of s > 1 tokens after a non-empty prefix uses the shifted causal mask."""
    model = make_model(SHAPES[name])
    x = tokens(2, 20, seed=2)
    with torch.no_grad():
        one = KVCache.for_model(model, batch=2, max_len=20)
        whole = forward_with_cache(model, x[:, :12], one)
        two = KVCache.for_model(model, batch=2, max_len=20)
        chunks = torch.cat([forward_with_cache(model, x[:, :5], two), forward_with_cache(model, x[:, 5:12], two)], 1)
        torch.testing.assert_close(chunks, whole, **TOL)
        # and a further chunk of 8 continues both caches like the full forward
        full = model(x)
        torch.testing.assert_close(forward_with_cache(model, x[:, 12:], one), full[:, 12:], **TOL)
        torch.testing.assert_close(forward_with_cache(model, x[:, 12:], two), full[:, 12:], **TOL)


def test_cache_reset_starts_a_new_sequence():
    model = make_model(SHAPES["dense_tied"])
    x = tokens(1, 12, seed=3)
    with torch.no_grad():
        cache = KVCache.for_model(model, max_len=12)
        forward_with_cache(model, tokens(1, 12, seed=4), cache)
        cache.reset()
        torch.testing.assert_close(forward_with_cache(model, x, cache), model(x), **TOL)


def test_sampling_is_reproducible_from_the_seed():
    model = make_model(SHAPES["moe_top2_every_layer"])
    prompt = [5, 17, 3]
    first = generate(model, prompt, 20, temperature=1.0, seed=7)
    assert generate(model, prompt, 20, temperature=1.0, seed=7) == first
    assert generate(model, prompt, 20, temperature=1.0, seed=7, use_cache=False) == first
    assert generate(model, prompt, 20, temperature=1.0, seed=8) != first


def test_top_k_1_is_greedy():
    model = make_model(SHAPES["dense_gqa_untied"])
    greedy = generate(model, [1, 2, 3], 20, temperature=0)
    for temperature, seed in [(1.0, 0), (5.0, 1)]:
        assert generate(model, [1, 2, 3], 20, temperature=temperature, top_k=1, seed=seed) == greedy


def test_top_k_and_vocab_size_limit_the_choice():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.5, -1.0, 2.9, 9.0])
    pick = token_picker(temperature=10.0, top_k=3, seed=0, vocab_size=6)  # id 6 is padding, never chosen
    chosen = {pick(logits) for _ in range(300)}
    assert chosen == {1, 3, 5}  # the 3 best below 6, each drawn at a high temperature
    assert token_picker(temperature=0, vocab_size=6)(logits) == 1


def test_generation_stops_after_eos():
    model = make_model(SHAPES["dense_tied"])
    greedy = generate(model, [4, 8], 20, temperature=0)
    eos = greedy[6]
    stop = greedy.index(eos)
    assert generate(model, [4, 8], 20, temperature=0, eos_id=eos) == greedy[:stop + 1]
    sampled = generate(model, [4, 8], 20, seed=3)
    eos = sampled[4]
    assert generate(model, [4, 8], 20, seed=3, eos_id=eos) == sampled[:sampled.index(eos) + 1]


def test_too_long_a_request_is_refused_with_what_to_lower():
    model = make_model(SHAPES["dense_tied"])
    with pytest.raises(ValueError, match=r"--max-new-tokens 10 = 50 positions exceeds the model's max_seq_len 48: "
                                         r"lower --max-new-tokens to at most 8"):
        generate(model, list(range(40)), 10)
    with pytest.raises(ValueError, match="shorten the prompt"):
        generate(model, list(range(SEQ)), 1)
    assert len(generate(model, list(range(40)), 8, temperature=0)) == 8  # exactly max_seq_len is fine
    with pytest.raises(ValueError, match="max_seq_len 48"):
        KVCache.for_model(model, max_len=SEQ + 1)
    cache = KVCache.for_model(model, max_len=8)
    with torch.no_grad():
        forward_with_cache(model, tokens(1, 6), cache)
        with pytest.raises(ValueError, match="6 cached \\+ 3 new positions exceed"):
            forward_with_cache(model, tokens(1, 3), cache)


def test_bad_arguments_are_refused():
    model = make_model(SHAPES["dense_tied"])
    for prompt in ([], [VOCAB], [-1]):
        with pytest.raises(ValueError, match="prompt"):
            generate(model, prompt, 3)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, [1], 3, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        generate(model, [1], 3, top_k=0)
    assert generate(model, [1], 0) == []


def test_generation_leaves_the_model_as_it_found_it():
    """Training flag restored, no gradients kept, MoE statistics pending before generation untouched and
    none added by it."""
    model = make_model(SHAPES["moe_every_other_gated_shared"]).train()
    model(tokens(1, 8)).sum().backward()  # a trainer's pending record per MoE layer
    pending = [len(layer.stats.pending) for layer in model.modules() if isinstance(layer, MoEFeedForward)]
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    generate(model, [1, 2, 3], 10, use_cache=True)
    generate(model, [1, 2, 3], 10, use_cache=False)
    assert model.training and all(m.training for m in model.modules())
    assert [len(layer.stats.pending) for layer in model.modules() if isinstance(layer, MoEFeedForward)] == pending
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, grads[name])


def test_serving_shape_is_dropless():
    capped = dataclasses.replace(SHAPES["moe_top2_every_layer"],
                                 moe=dataclasses.replace(SHAPES["moe_top2_every_layer"].moe, capacity_factor=1.0))
    served = serving_shape(capped)
    assert served.moe.capacity_factor is None
    assert dataclasses.replace(served.moe, capacity_factor=1.0) == capped.moe  # nothing else changes
    assert serving_shape(SHAPES["dense_tied"]) is SHAPES["dense_tied"]
    # the weights are the same: a checkpoint of the capped model loads into the served one
    build_model(served, 0).load_state_dict(build_model(capped, 0).state_dict(), strict=True)
