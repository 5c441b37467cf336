"""Tests of ppmoe.model: shapes, causality, GQA, rotary embeddings, deterministic init, tied
embeddings, the config -> shape mapping and the FLOPs count. Tiny models keep it to a few seconds."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn

from ppmoe.config import load_config
from ppmoe.model import GPT, GPTShape, build_model, model_shape, training_flops_per_token
from ppmoe.model.flops import matmul_params
from ppmoe.layers import apply_rotary, rotary_tables

torch.set_num_threads(1)

SHAPE = GPTShape(n_layers=2, d_model=32, n_heads=4, n_kv_heads=4, ffn_hidden=64, vocab_size=104,
                 max_seq_len=16)


def tokens(batch: int, seq: int, vocab: int = SHAPE.vocab_size, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_output_shape_is_batch_seq_padded_vocab():
    cfg = load_config(None, ["model.d_model=32", "model.n_layers=2", "model.vocab_multiple=64",
                             "train.seq_len=16"])
    shape = model_shape(cfg, vocab_size=100)
    assert shape.vocab_size == 128
    model = build_model(shape, seed=0)
    for b, s in [(2, 16), (3, 5), (1, 1)]:
        logits = model(tokens(b, s, vocab=100))
        assert logits.shape == (b, s, 128)
        assert logits.dtype == torch.float32
        assert torch.isfinite(logits).all()


def test_causality_future_tokens_do_not_change_past_logits():
    model = build_model(SHAPE, seed=1).eval()
    x = tokens(2, 12)
    with torch.no_grad():
        base = model(x)
        for t in (0, 5, 11):
            y = x.clone()
            y[:, t] = (y[:, t] + 7) % SHAPE.vocab_size
            out = model(y)
            torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=1e-6)
            # The change does reach position t itself (the test could see a leak).
            assert (out[:, t] - base[:, t]).abs().max() > 1e-4


def test_prefix_logits_do_not_depend_on_sequence_length():
    model = build_model(SHAPE, seed=2).eval()
    x = tokens(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x[:, :9]), model(x)[:, :9], rtol=1e-5, atol=1e-5)


def gqa_to_mha_state(state: dict, n_heads: int, n_kv_heads: int, head_dim: int) -> dict:
    """Repeat each kv head's k/v rows for the query heads of its group."""
    group = n_heads // n_kv_heads
    out = {}
    for name, value in state.items():
        if name.endswith(("attention.wk.weight", "attention.wv.weight")):
            d_in = value.shape[1]
            value = value.view(n_kv_heads, head_dim, d_in).repeat_interleave(group, dim=0)
            value = value.reshape(n_heads * head_dim, d_in)
        out[name] = value
    return out


@pytest.mark.parametrize("n_heads, n_kv_heads", [(4, 2), (4, 1), (8, 2)])
def test_gqa_equals_mha_with_repeated_kv_heads(n_heads, n_kv_heads):
    gqa_shape = dataclasses.replace(SHAPE, n_heads=n_heads, n_kv_heads=n_kv_heads)
    mha_shape = dataclasses.replace(gqa_shape, n_kv_heads=n_heads)
    gqa = build_model(gqa_shape, seed=3).eval()
    mha = build_model(mha_shape, seed=4).eval()
    head_dim = SHAPE.d_model // n_heads
    assert gqa.layers["0"].attention.wk.weight.shape == (n_kv_heads * head_dim, SHAPE.d_model)
    assert n_params(gqa) < n_params(mha)
    mha.load_state_dict(gqa_to_mha_state(gqa.state_dict(), n_heads, n_kv_heads, head_dim))
    x = tokens(2, 16, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(gqa(x), mha(x), rtol=1e-5, atol=1e-5)
        if n_kv_heads == 1:  # tiling and repeating are the same thing with one kv head
            return
        # Sanity: a wrong layout (tiling instead of repeating per group) gives different outputs.
        wrong = {k: (v.view(n_kv_heads, head_dim, -1).repeat(n_heads // n_kv_heads, 1, 1).reshape(-1, v.shape[1])
                     if k.endswith(("wk.weight", "wv.weight")) else v)
                 for k, v in gqa.state_dict().items()}
        mha.load_state_dict(wrong)
        assert not torch.allclose(gqa(x), mha(x), rtol=1e-4, atol=1e-4)


def test_rotary_tables_shape_and_values():
    cos, sin = rotary_tables(8, 16, 10000.0)
    assert cos.shape == sin.shape == (16, 4)
    torch.testing.assert_close(cos[0], torch.ones(4))
    torch.testing.assert_close(sin[0], torch.zeros(4))
    # Channel pair i turns by position * theta^(-2i/head_dim).
    torch.testing.assert_close(sin[3, 1], torch.sin(torch.tensor(3 * 10000.0 ** (-2 / 8))))


def test_apply_rotary_preserves_norms():
    head_dim, seq = 8, 16
    cos, sin = rotary_tables(head_dim, seq, 10000.0)
    x = torch.randn(2, seq, 3, head_dim, generator=torch.Generator().manual_seed(0))
    y = apply_rotary(x, cos, sin)
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y[:, 0], x[:, 0])  # position 0 is not rotated
    assert not torch.allclose(y[:, 1:], x[:, 1:], atol=1e-3)


def test_rotary_dot_product_depends_only_on_relative_position():
    head_dim, seq = 8, 16
    cos, sin = rotary_tables(head_dim, seq, 10000.0)
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(head_dim, generator=g), torch.randn(head_dim, generator=g)
    # The same q (and the same k) at every position, one head.
    q_rot = apply_rotary(q.expand(1, seq, 1, head_dim).contiguous(), cos, sin)[0, :, 0]
    k_rot = apply_rotary(k.expand(1, seq, 1, head_dim).contiguous(), cos, sin)[0, :, 0]
    scores = q_rot @ k_rot.T  # [query position m, key position n]
    for offset in (0, 1, 3, 7):
        diagonal = torch.diagonal(scores, offset=-offset)  # m - n == offset
        torch.testing.assert_close(diagonal, diagonal[0].expand_as(diagonal), rtol=1e-5, atol=1e-5)
    # ...and does depend on it.
    assert not torch.allclose(scores[5, 5], scores[5, 2], atol=1e-3)


def test_build_model_is_deterministic_per_seed_and_keeps_global_rng():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = build_model(SHAPE, seed=7)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's generator is left as it was
    b = build_model(SHAPE, seed=7)
    c = build_model(SHAPE, seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys() == sc.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name
    matrices = [name for name in sa if sa[name].dim() >= 2]
    assert matrices
    for name in matrices:
        assert not torch.equal(sa[name], sc[name]), name


def test_init_std_and_residual_scaling():
    shape = dataclasses.replace(SHAPE, d_model=64, ffn_hidden=256, n_layers=2, init_std=0.02)
    model = build_model(shape, seed=0)
    block = model.layers["0"]
    assert torch.equal(block.attention_norm.weight, torch.ones(64))
    assert abs(block.attention.wq.weight.std().item() - 0.02) < 0.002
    assert abs(block.attention.wo.weight.std().item() - 0.02 / 2) < 0.001  # 1/sqrt(2 * 2 layers)
    assert abs(block.feed_forward.w2.weight.std().item() - 0.02 / 2) < 0.001


def test_tie_embeddings_shares_weight_and_drops_params():
    untied = build_model(SHAPE, seed=0)
    tied = build_model(dataclasses.replace(SHAPE, tie_embeddings=True), seed=0)
    assert tied.output.weight is tied.tok_embeddings.weight
    assert untied.output.weight is not untied.tok_embeddings.weight
    assert n_params(untied) - n_params(tied) == SHAPE.vocab_size * SHAPE.d_model
    # Still shared after a step of an optimizer, and gradients from both uses accumulate into one.
    x = tokens(2, 8)
    tied(x).sum().backward()
    assert tied.tok_embeddings.weight.grad is not None
    with torch.no_grad():
        tied.tok_embeddings.weight.add_(1.0)
    assert torch.equal(tied.output.weight, tied.tok_embeddings.weight)


def test_model_shape_pads_vocab_and_derives_ffn():
    cfg = load_config(None, ["model.d_model=32", "model.n_heads=4", "model.n_layers=3",
                             "model.vocab_multiple=64", "train.seq_len=24", "model.rope_theta=500.0"])
    shape = model_shape(cfg, vocab_size=100)
    assert shape.vocab_size == 128
    assert shape.ffn_hidden == 128  # 8/3 * 32 = 85.3 -> next multiple of 64
    assert shape.n_kv_heads == 4  # null means n_heads
    assert shape.n_layers == 3 and shape.max_seq_len == 24 and shape.rope_theta == 500.0
    assert model_shape(cfg, vocab_size=128).vocab_size == 128  # already a multiple
    assert model_shape(cfg, vocab_size=129).vocab_size == 192
    # d_model 96 -> 8/3 * 96 = 256 exactly.
    assert model_shape(load_config(None, ["model.d_model=96"]), 10).ffn_hidden == 256
    # Explicit values win.
    cfg = load_config(None, ["model.ffn_hidden=100", "model.n_kv_heads=2", "model.vocab_size=300",
                             "model.vocab_multiple=128"])
    shape = model_shape(cfg, vocab_size=50)
    assert shape.ffn_hidden == 100 and shape.n_kv_heads == 2
    assert shape.vocab_size == 384  # model.vocab_size beats the dataset's
    with pytest.raises(ValueError, match="vocab_size"):
        model_shape(load_config(), None)


def linear_weight_params(model: nn.Module) -> int:
    """Weights of every Linear (each use of a tied weight counts: it is a matmul per token)."""
    total = 0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            assert module.bias is None
            total += module.weight.numel()
    return total


@pytest.mark.parametrize("changes", [
    {},
    {"n_kv_heads": 2},
    {"tie_embeddings": True},
    {"n_layers": 3, "n_heads": 8, "n_kv_heads": 1, "ffn_hidden": 96},
])
def test_training_flops_per_token(changes):
    shape = dataclasses.replace(SHAPE, **changes)
    model = build_model(shape, seed=0)
    counted = linear_weight_params(model)
    assert matmul_params(shape) == counted
    for seq in (16, 1024):
        expected = 6 * counted + 6 * shape.n_layers * shape.d_model * seq
        assert training_flops_per_token(shape, seq) == expected


def test_forward_rejects_sequences_longer_than_max_seq_len():
    model = build_model(SHAPE, seed=0)
    model(tokens(1, SHAPE.max_seq_len))  # exactly max_seq_len is fine
    with pytest.raises(ValueError, match="max_seq_len"):
        model(tokens(1, SHAPE.max_seq_len + 1))


def test_backward_reaches_every_parameter():
    model = build_model(SHAPE, seed=0)
    model(tokens(2, 8)).logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_rotary_buffers_not_in_state_dict():
    model = GPT(SHAPE)
    assert "rope_cos" not in model.state_dict() and "rope_sin" not in model.state_dict()
    assert model.rope_cos.shape == (SHAPE.max_seq_len, SHAPE.d_model // SHAPE.n_heads // 2)
