"""Tests of the optimizer side: the warmup + cosine schedule, AdamW parameter groups, and global
gradient-norm clipping on a plain (single-process, non-distributed) model."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.distributed as dist

from ppmoe.config import TrainConfig
from ppmoe.model import GPTShape, build_model
from ppmoe.parallel.grad_norm import clip_grad_norm, global_grad_norm
from ppmoe.train.optim import build_optimizer, lr_at, set_lr

torch.set_num_threads(1)

SHAPE = GPTShape(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, ffn_hidden=64, vocab_size=104,
                 max_seq_len=16)
CFG = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, steps=110)


# ---- learning-rate schedule ----------------------------------------------------------------------

def test_warmup_is_linear_from_zero():
    assert lr_at(0, CFG) == 0.0
    assert lr_at(1, CFG) == pytest.approx(1e-4, rel=1e-12)
    assert lr_at(5, CFG) == pytest.approx(5e-4, rel=1e-12)
    assert lr_at(9, CFG) == pytest.approx(9e-4, rel=1e-12)
    warm = [lr_at(s, CFG) for s in range(CFG.warmup_steps + 1)]
    steps = [b - a for a, b in zip(warm, warm[1:])]
    assert all(d == pytest.approx(CFG.lr / CFG.warmup_steps, rel=1e-9) for d in steps)


def test_peak_at_warmup_steps():
    assert lr_at(CFG.warmup_steps, CFG) == CFG.lr
    assert max(lr_at(s, CFG) for s in range(CFG.steps + 1)) == CFG.lr
    assert lr_at(CFG.warmup_steps + 1, CFG) < CFG.lr


def test_cosine_reaches_min_lr_at_last_step():
    assert lr_at(CFG.steps, CFG) == CFG.min_lr  # exactly, not approximately
    # Halfway through the decay: the midpoint of lr and min_lr.
    half = CFG.warmup_steps + (CFG.steps - CFG.warmup_steps) // 2
    assert lr_at(half, CFG) == pytest.approx((CFG.lr + CFG.min_lr) / 2, rel=1e-12)
    # A quarter of the way: min + (lr - min) * (1 + cos(pi / 4)) / 2.
    quarter = CFG.warmup_steps + (CFG.steps - CFG.warmup_steps) // 4
    expected = CFG.min_lr + (CFG.lr - CFG.min_lr) * (1 + math.cos(math.pi / 4)) / 2
    assert lr_at(quarter, CFG) == pytest.approx(expected, rel=1e-12)
    # Past the end it stays at min_lr.
    assert lr_at(CFG.steps + 50, CFG) == CFG.min_lr


def test_monotone_decreasing_after_warmup():
    values = [lr_at(s, CFG) for s in range(CFG.warmup_steps, CFG.steps + 1)]
    assert all(b < a for a, b in zip(values, values[1:]))
    assert all(CFG.min_lr <= v <= CFG.lr for v in values)


def test_schedule_without_warmup():
    cfg = dataclasses.replace(CFG, warmup_steps=0, steps=20)
    assert lr_at(1, cfg) < cfg.lr and lr_at(1, cfg) == pytest.approx(
        cfg.min_lr + (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi / 20)) / 2, rel=1e-12)
    assert lr_at(20, cfg) == cfg.min_lr


def test_set_lr_sets_every_group():
    opt = build_optimizer(build_model(SHAPE, seed=0), CFG, torch.device("cpu"))
    set_lr(opt, 0.123)
    assert [g["lr"] for g in opt.param_groups] == [0.123, 0.123]


# ---- parameter groups ----------------------------------------------------------------------------

@pytest.mark.parametrize("tie", [False, True])
def test_optimizer_groups_decay_matrices_only(tie):
    model = build_model(dataclasses.replace(SHAPE, tie_embeddings=tie), seed=0)
    opt = build_optimizer(model, CFG, torch.device("cpu"))
    assert isinstance(opt, torch.optim.AdamW)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == CFG.weight_decay and no_decay["weight_decay"] == 0.0
    for group in opt.param_groups:
        assert group["lr"] == CFG.lr and group["betas"] == (CFG.beta1, CFG.beta2)
    assert decay["params"] and no_decay["params"]
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() == 1 for p in no_decay["params"])
    # Every parameter exactly once, over both groups.
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert "tok_embeddings.weight" in decayed and "layers.0.attention.wq.weight" in decayed
    assert ("output.weight" in decayed) != tie  # tied: one shared tensor, listed under its first name
    assert {names[id(p)] for p in no_decay["params"]} == {
        "layers.0.attention_norm.weight", "layers.0.ffn_norm.weight",
        "layers.1.attention_norm.weight", "layers.1.ffn_norm.weight", "norm.weight"}


def test_frozen_parameters_are_left_out():
    model = build_model(SHAPE, seed=0)
    model.norm.weight.requires_grad_(False)
    opt = build_optimizer(model, CFG, torch.device("cpu"))
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(model.norm.weight) not in ids
    assert len(ids) == sum(1 for p in model.parameters() if p.requires_grad)


def test_weight_decay_only_moves_matrices_without_gradients():
    model = build_model(SHAPE, seed=0)
    with torch.no_grad():
        model.norm.weight.fill_(2.0)
    before = copy.deepcopy(model.state_dict())
    opt = build_optimizer(model, dataclasses.replace(CFG, weight_decay=0.5), torch.device("cpu"))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.equal(model.norm.weight, before["norm.weight"])  # no decay on vectors
    torch.testing.assert_close(model.output.weight, before["output.weight"] * (1 - CFG.lr * 0.5))


# ---- gradient clipping ---------------------------------------------------------------------------

def model_with_grads(seed: int, tie: bool = False):
    model = build_model(dataclasses.replace(SHAPE, tie_embeddings=tie), seed=seed)
    x = torch.randint(0, SHAPE.vocab_size, (2, 12), generator=torch.Generator().manual_seed(seed))
    model(x).logsumexp(-1).mean().mul(50.0).backward()
    return model


@pytest.mark.parametrize("max_norm_factor", [0.1, 0.5, 2.0])
@pytest.mark.parametrize("tie", [False, True])
def test_clip_grad_norm_matches_torch_without_process_group(max_norm_factor, tie):
    assert not dist.is_initialized()  # plain tensors need no process group
    ours = model_with_grads(seed=1, tie=tie)
    ref = copy.deepcopy(ours)  # (deepcopy of a Parameter does not copy .grad)
    for p, q in zip(ours.parameters(), ref.parameters()):
        q.grad = p.grad.clone()
    if tie:
        assert ref.output.weight is ref.tok_embeddings.weight
    full = torch.cat([p.grad.flatten() for p in ours.parameters()]).norm()
    max_norm = max_norm_factor * float(full)
    norm = clip_grad_norm(ours.parameters(), max_norm)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
    assert not dist.is_initialized()
    assert norm.dim() == 0 and norm.dtype == torch.float32
    torch.testing.assert_close(norm, ref_norm, rtol=1e-5, atol=0)
    torch.testing.assert_close(norm, full, rtol=1e-5, atol=0)
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-9, msg=name)
    after = torch.cat([p.grad.flatten() for p in ours.parameters()]).norm()
    if max_norm_factor < 1:
        assert after == pytest.approx(max_norm, rel=1e-4)
    else:
        assert after == pytest.approx(float(full), rel=1e-6)


def test_clip_zero_measures_only():
    model = model_with_grads(seed=2)
    grads = [p.grad.clone() for p in model.parameters()]
    norm = clip_grad_norm(model.parameters(), 0.0)
    assert float(norm) > 0
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(p.grad, g)


def test_global_grad_norm_skips_missing_grads_and_counts_duplicates_once():
    model = model_with_grads(seed=3)
    model.norm.weight.grad = None
    params = list(model.parameters())
    expected = torch.cat([p.grad.flatten() for p in params if p.grad is not None]).norm()
    torch.testing.assert_close(global_grad_norm(params + params[:3]), expected, rtol=1e-5, atol=0)
    # A duplicated parameter is also scaled once, not twice.
    before = params[0].grad.clone()
    norm = clip_grad_norm(params + [params[0]], 0.5 * float(expected))
    torch.testing.assert_close(norm, expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(params[0].grad, before * (0.5 * float(expected) / (float(expected) + 1e-6)))
    assert float(global_grad_norm([])) == 0.0
