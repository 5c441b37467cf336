"""Tests of ppmoe.growth's operators: every exact operator keeps the logits (rel. 1e-5, identity depth
bit-exact), the inexact ones say so and do move them, refused shape pairs raise, noise breaks the copies'
symmetry under AdamW, grad_scale matches real gradients, and building is pure (order, subset, process).
Tiny models (d_model 16-64, seq 8, vocab 64) keep the file to a few seconds on 2 cores."""

from __future__ import annotations

import dataclasses
import pickle
import random

import pytest
import torch
import torch.nn.functional as F

from ppmoe.config import GrowthOpsConfig
from ppmoe.growth import apply_growth, build_moment, build_weight, growth_is_exact, growth_map, key_generator
from ppmoe.growth.recipe import apply_steps
from ppmoe.model import GPT, GPTShape, build_model
from ppmoe.moe import MoEShape

torch.set_num_threads(1)

VOCAB, SEQ = 64, 8
BASE = GPTShape(n_layers=2, d_model=16, n_heads=4, n_kv_heads=2, ffn_hidden=32, vocab_size=VOCAB, max_seq_len=SEQ,
                init_std=0.1)


def shape(base: GPTShape = BASE, **changes) -> GPTShape:
    return dataclasses.replace(base, **changes)


def moe(**fields) -> MoEShape:
    """A dropless, jitter-free MoE shape (one expert kernel throughout)."""
    return MoEShape(**{"num_experts": 4, "top_k": 1, "expert_hidden": 32, "expert_kernel": "loop", **fields})


def ops(**fields) -> GrowthOpsConfig:
    return GrowthOpsConfig(**{"noise": 0.0, **fields})


def old_model(old: GPTShape, seed: int = 0) -> GPT:
    """A model whose every parameter is perturbed (norm gains too), so no operator passes by luck."""
    model = build_model(old, seed)
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


def grown_model(state: dict[str, torch.Tensor], new: GPTShape) -> GPT:
    model = GPT(new)
    model.load_state_dict(state, strict=True)
    return model.eval()


def tokens(batch: int = 3, seed: int = 7) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


def grow(old: GPTShape, new: GPTShape, growth: GrowthOpsConfig, seed: int = 0, stage: str = "s1"):
    """(old model, grown model, recipes)."""
    model = old_model(old, seed)
    state = apply_growth(model.state_dict(), old, new, growth, seed=seed, stage=stage)
    return model, grown_model(state, new), growth_map(old, new, growth)


def logit_change(a: GPT, b: GPT, x: torch.Tensor | None = None) -> float:
    """max |logits_b - logits_a| / max |logits_a|."""
    x = tokens() if x is None else x
    with torch.no_grad():
        la, lb = a(x), b(x)
    return ((lb - la).abs().max() / la.abs().max()).item()


def assert_exact(old: GPTShape, new: GPTShape, growth: GrowthOpsConfig) -> dict:
    before, after, recipes = grow(old, new, growth)
    exact, notes = growth_is_exact(recipes)
    assert exact, notes
    assert logit_change(before, after) <= 1e-5
    return recipes


def assert_inexact(old: GPTShape, new: GPTShape, growth: GrowthOpsConfig, words: str) -> None:
    before, after, recipes = grow(old, new, growth)
    exact, notes = growth_is_exact(recipes)
    assert not exact
    assert any(words in note for note in notes), notes
    assert logit_change(before, after) > 1e-3


# 0. Nothing to grow ----------------------------------------------------------------------------------------

def test_no_growth_is_the_identity_with_fresh_storage():
    model = old_model(shape(moe=moe(top_k=2, every=2, shared_expert_hidden=16)))
    old = model.shape
    recipes = growth_map(old, old, ops(noise=0.01))
    state = model.state_dict()
    assert list(recipes) == list(state)
    grown = apply_growth(state, old, old, ops(noise=0.01), seed=0, stage="s")
    for key, recipe in recipes.items():
        assert (recipe.source, recipe.steps, recipe.scale, recipe.exact, recipe.note) == (key, (), 1.0, True, "copy")
        assert torch.equal(grown[key], state[key])
        assert grown[key].untyped_storage().data_ptr() != state[key].untyped_storage().data_ptr()


# 1. FFN hidden tiling ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("noise", [0.0, 0.01])
def test_ffn_tile_x2_is_exact(noise):
    recipes = assert_exact(BASE, shape(ffn_hidden=64), ops(noise=noise))
    w2 = recipes["layers.0.feed_forward.w2.weight"]
    assert (w2.scale, w2.grad_scale, w2.copy_axis, w2.copies) == (0.5, 1.0, 1, 2)
    w1 = recipes["layers.0.feed_forward.w1.weight"]
    assert (w1.scale, w1.grad_scale, w1.copy_axis) == (1.0, 0.5, None)


def test_noise_changes_the_weights_but_not_their_sum_over_copies():
    model = old_model(BASE)
    new = shape(ffn_hidden=64)
    clean = apply_growth(model.state_dict(), BASE, new, ops(noise=0.0), seed=0, stage="s")
    noisy = apply_growth(model.state_dict(), BASE, new, ops(noise=0.01), seed=0, stage="s")
    key = "layers.1.feed_forward.w2.weight"
    assert (noisy[key] - clean[key]).abs().max() > 1e-4
    torch.testing.assert_close(noisy[key][:, :32] + noisy[key][:, 32:], clean[key][:, :32] + clean[key][:, 32:])
    for k in ("layers.1.feed_forward.w1.weight", "tok_embeddings.weight", "layers.1.ffn_norm.weight"):
        assert torch.equal(noisy[k], clean[k])  # no copy axis, no noise


# 2. Width ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("noise", [0.0, 0.01])
def test_width_x2_with_gqa_is_exact(noise):
    recipes = assert_exact(BASE, shape(d_model=32, n_heads=8, n_kv_heads=4), ops(noise=noise))
    wk = recipes["layers.0.attention.wk.weight"]
    assert wk.shape == (16, 32) and (wk.scale, wk.grad_scale, wk.copy_axis, wk.copies) == (0.5, 0.5, 1, 2)
    emb, out = recipes["tok_embeddings.weight"], recipes["output.weight"]
    assert (emb.scale, emb.grad_scale, emb.copy_axis) == (1.0, 0.5, None)
    assert (out.scale, out.grad_scale, out.copy_axis) == (0.5, 1.0, 1)


def test_width_x4_with_noise_is_exact():
    assert_exact(BASE, shape(d_model=64, n_heads=16, n_kv_heads=8), ops(noise=0.01))


# 3. Depth -------------------------------------------------------------------------------------------------------

def test_identity_depth_x2_is_bit_exact():
    before, after, recipes = grow(BASE, shape(n_layers=4), ops(depth="identity"))
    assert growth_is_exact(recipes) == (True, [])
    assert recipes["layers.3.attention.wo.weight"].scale == 0.0
    assert recipes["layers.3.attention.wq.weight"].source == "layers.1.attention.wq.weight"
    assert recipes["layers.2.attention.wo.weight"].scale == 1.0
    x = tokens()
    with torch.no_grad():
        assert torch.equal(before(x), after(x))


@pytest.mark.parametrize("depth", ["stack", "interpose"])
def test_stack_and_interpose_are_flagged_and_move_the_logits(depth):
    assert_inexact(BASE, shape(n_layers=4), ops(depth=depth), f"depth {depth}")
    recipes = growth_map(BASE, shape(n_layers=4), ops(depth=depth))
    expected_source = {"stack": 0, "interpose": 1}[depth]
    assert recipes["layers.2.attention.wq.weight"].source == f"layers.{expected_source}.attention.wq.weight"


def test_stack_to_a_non_multiple_depth():
    recipes = growth_map(BASE, shape(n_layers=3), ops(depth="stack"))
    assert recipes["layers.2.ffn_norm.weight"].source == "layers.0.ffn_norm.weight"
    with pytest.raises(ValueError, match="model.n_layers 2 -> 3"):
        growth_map(BASE, shape(n_layers=3), ops(depth="identity"))


# 4. Composition ------------------------------------------------------------------------------------------------

def test_identity_depth_width_and_ffn_together_with_noise():
    new = shape(n_layers=4, d_model=32, n_heads=8, n_kv_heads=4, ffn_hidden=64)
    recipes = assert_exact(BASE, new, ops(depth="identity", noise=0.01))
    w2 = recipes["layers.2.feed_forward.w2.weight"]  # ffn tile /2, width tiles its output
    assert (w2.source, w2.scale, w2.grad_scale) == ("layers.1.feed_forward.w2.weight", 0.5, 0.5)
    assert recipes["layers.3.feed_forward.w2.weight"].scale == 0.0


# 5. MoE: width and hidden sizes -------------------------------------------------------------------------------

def test_moe_every_other_layer_width_expert_hidden_and_shared_hidden():
    old = shape(moe=moe(top_k=2, every=2, shared_expert_hidden=16))
    new = shape(d_model=32, n_heads=8, n_kv_heads=4,
                moe=moe(top_k=2, every=2, expert_hidden=64, shared_expert_hidden=32))
    recipes = assert_exact(old, new, ops(noise=0.01))
    w2 = recipes["layers.1.feed_forward.experts.w2"]
    assert w2.shape == (4, 64, 32) and (w2.scale, w2.copy_axis, w2.copies) == (0.5, 1, 2)
    gate = recipes["layers.1.feed_forward.router.gate.weight"]
    assert gate.shape == (4, 32) and (gate.scale, gate.copy_axis) == (0.5, 1)


# 6. Upcycling -------------------------------------------------------------------------------------------------

def test_upcycle_top1_zero_router_is_exact_with_w2_times_e():
    new = shape(moe=moe(num_experts=4, top_k=1, expert_hidden=32))
    recipes = assert_exact(BASE, new, ops(router_std=0.0))
    w2 = recipes["layers.0.feed_forward.experts.w2"]
    assert w2.source == "layers.0.feed_forward.w2.weight" and w2.scale == 4.0 and w2.shape == (4, 32, 16)
    assert recipes["layers.0.feed_forward.router.gate.weight"].source is None


def test_upcycle_top2_renormalised_with_a_random_router_and_wider_experts():
    new = shape(moe=moe(num_experts=4, top_k=2, expert_hidden=64))
    recipes = assert_exact(BASE, new, ops(router_std=0.02, noise=0.01))
    w2 = recipes["layers.1.feed_forward.experts.w2"]
    assert (w2.scale, w2.copy_axis, w2.copies) == (0.5, 1, 2)  # renormalised: x1, then the hidden tiling's /2
    model = old_model(BASE)
    grown = apply_growth(model.state_dict(), BASE, new, ops(router_std=0.02), seed=0, stage="s")
    assert 0.01 < grown["layers.1.feed_forward.router.gate.weight"].std() < 0.04


def test_upcycle_top1_with_a_random_router_is_flagged():
    new = shape(moe=moe(num_experts=4, top_k=1))
    before, after, recipes = grow(BASE, new, ops(router_std=1e-3))
    exact, notes = growth_is_exact(recipes)
    assert not exact and any("E * p_max" in n for n in notes), notes
    assert logit_change(before, after) > 1e-5


def test_upcycle_needs_an_integer_hidden_ratio():
    with pytest.raises(ValueError, match="moe.expert_hidden 32 -> 48"):
        growth_map(BASE, shape(moe=moe(expert_hidden=48)), ops())


# 7. Expert growth ---------------------------------------------------------------------------------------------

def test_duplicate_top1_is_exact():
    recipes = assert_exact(shape(moe=moe(num_experts=4)), shape(moe=moe(num_experts=8)), ops(experts="duplicate"))
    w2 = recipes["layers.0.feed_forward.experts.w2"]
    assert (w2.scale, w2.grad_scale) == (2.0, 0.5)


def test_duplicate_with_top_k_times_m_is_exact():
    old, new = shape(moe=moe(num_experts=4, top_k=2)), shape(moe=moe(num_experts=8, top_k=4))
    recipes = assert_exact(old, new, ops(experts="duplicate", noise=0.01))
    assert recipes["layers.0.feed_forward.experts.w2"].scale == 1.0


def test_duplicate_at_a_fixed_top_k_above_1_is_flagged():
    old, new = shape(moe=moe(num_experts=4, top_k=2)), shape(moe=moe(num_experts=8, top_k=2))
    assert_inexact(old, new, ops(experts="duplicate"), "crowd out")


def test_split_with_top_k_times_m_without_renormalisation_is_exact():
    old = shape(moe=moe(num_experts=4, top_k=1, expert_hidden=32, normalize_topk=False))
    new = shape(moe=moe(num_experts=8, top_k=2, expert_hidden=16, normalize_topk=False))
    recipes = assert_exact(old, new, ops(experts="split"))
    w1 = recipes["layers.1.feed_forward.experts.w1"]
    assert w1.shape == (8, 16, 16) and w1.scale == 1.0
    assert recipes["layers.1.feed_forward.experts.w2"].scale == 2.0


def test_split_expert_layout_is_expert_major():
    old = shape(moe=moe(num_experts=4, top_k=1, expert_hidden=32, normalize_topk=False))
    new = shape(moe=moe(num_experts=8, top_k=2, expert_hidden=16, normalize_topk=False))
    model = old_model(old)
    state = model.state_dict()
    grown = apply_growth(state, old, new, ops(experts="split"), seed=0, stage="s")
    w1, gate = state["layers.0.feed_forward.experts.w1"], state["layers.0.feed_forward.router.gate.weight"]
    for e in range(4):
        for c in range(2):
            assert torch.equal(grown["layers.0.feed_forward.experts.w1"][e * 2 + c], w1[e, :, c * 16:(c + 1) * 16])
            assert torch.equal(grown["layers.0.feed_forward.router.gate.weight"][e * 2 + c], gate[e])


def test_split_that_switches_renormalisation_on_is_flagged():
    old = shape(moe=moe(num_experts=4, top_k=1, expert_hidden=32))
    new = shape(moe=moe(num_experts=8, top_k=2, expert_hidden=16))
    assert_inexact(old, new, ops(experts="split"), "renormalisation")


def test_expert_growth_refusals():
    old = shape(moe=moe(num_experts=4, top_k=1))
    with pytest.raises(ValueError, match="moe.num_experts 4 -> 6"):
        growth_map(old, shape(moe=moe(num_experts=6)), ops())
    with pytest.raises(ValueError, match="moe.top_k 1 -> 3"):
        growth_map(old, shape(moe=moe(num_experts=8, top_k=3)), ops(experts="duplicate"))
    with pytest.raises(ValueError, match="moe.top_k 1 -> 1"):
        growth_map(old, shape(moe=moe(num_experts=8, top_k=1, expert_hidden=16)), ops(experts="split"))
    with pytest.raises(ValueError, match="moe.top_k 1 -> 2"):
        growth_map(old, shape(moe=moe(num_experts=4, top_k=2)), ops())


# 8. Shared experts and refusals -------------------------------------------------------------------------------

def test_a_new_shared_expert_is_exact():
    old = shape(moe=moe(top_k=2, every=2))
    new = shape(moe=moe(top_k=2, every=2, shared_expert_hidden=16))
    recipes = assert_exact(old, new, ops(noise=0.01))
    w1 = recipes["layers.1.feed_forward.shared_expert.w1.weight"]
    w2 = recipes["layers.1.feed_forward.shared_expert.w2.weight"]
    assert w1.source is None and w1.fresh_std == new.init_std
    assert w2.source is None and w2.scale == 0.0


def test_moe_to_dense_is_refused():
    with pytest.raises(ValueError, match="cannot become dense"):
        growth_map(shape(moe=moe()), BASE, ops())
    # interpose puts old MoE layer 1 (every=2) on new dense layer 2
    old = shape(moe=moe(every=2))
    with pytest.raises(ValueError, match="layer 2 of the new model is dense"):
        growth_map(old, shape(n_layers=4, moe=moe(every=2)), ops(depth="interpose"))


def test_removing_a_shared_expert_is_refused():
    with pytest.raises(ValueError, match="moe.shared_expert_hidden 16 -> 0"):
        growth_map(shape(moe=moe(shared_expert_hidden=16)), shape(moe=moe()), ops())


def test_width_growth_with_tied_embeddings_is_refused():
    old = shape(tie_embeddings=True)
    with pytest.raises(ValueError, match="tie_embeddings"):
        growth_map(old, shape(old, d_model=32, n_heads=8, n_kv_heads=4), ops())


def test_tied_embeddings_grow_in_depth_and_ffn():
    old = shape(tie_embeddings=True)
    assert_exact(old, shape(old, n_layers=4, ffn_hidden=64), ops(depth="identity", noise=0.01))


@pytest.mark.parametrize("change, dimension", [
    ({"ffn_hidden": 48}, "model.ffn_hidden 32 -> 48"),
    ({"d_model": 24, "n_heads": 6, "n_kv_heads": 3}, "model.d_model 16 -> 24"),
    ({"d_model": 32, "n_heads": 4, "n_kv_heads": 2}, "n_heads 4 -> 8"),
    ({"n_heads": 8, "n_kv_heads": 4}, "at a fixed d_model"),
    ({"n_layers": 3}, "model.n_layers 2 -> 3"),
    ({"n_layers": 1}, "cannot shrink"),
    ({"vocab_size": 128}, "model.vocab_size"),
    ({"moe": moe(every=2, shared_expert_hidden=16)}, None),  # fine: upcycling with a new shared expert
])
def test_non_integer_or_unmappable_ratios_name_the_dimension(change, dimension):
    growth = ops(depth="interpose")
    if dimension is None:
        growth_map(BASE, shape(**change), growth)
        return
    with pytest.raises(ValueError, match=dimension):
        growth_map(BASE, shape(**change), growth)


def test_shared_expert_and_expert_hidden_ratios_name_the_dimension():
    old = shape(moe=moe(shared_expert_hidden=16))
    with pytest.raises(ValueError, match="moe.shared_expert_hidden 16 -> 24"):
        growth_map(old, shape(moe=moe(shared_expert_hidden=24)), ops())
    with pytest.raises(ValueError, match="moe.expert_hidden 32 -> 40"):
        growth_map(old, shape(moe=moe(expert_hidden=40, shared_expert_hidden=16)), ops())


# 9. Symmetry breaking under AdamW ------------------------------------------------------------------------------

def train_copies(noise: float, steps: int = 20) -> dict[str, torch.Tensor]:
    new = shape(d_model=32, n_heads=8, n_kv_heads=4, ffn_hidden=64)
    _, model, _ = grow(BASE, new, ops(noise=noise))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(3)
    for _ in range(steps):
        batch = torch.randint(0, VOCAB, (4, SEQ + 1), generator=g)
        loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def trained_without_and_with_noise():
    return train_copies(0.0), train_copies(0.01)


def copy_gaps(state: dict[str, torch.Tensor]) -> dict[str, float]:
    w1 = state["layers.0.feed_forward.w1.weight"]  # [2f, 2d]: hidden copies along dim 0
    emb = state["tok_embeddings.weight"]            # [V, 2d]: stream copies along dim 1
    wq = state["layers.1.attention.wq.weight"]      # [2*H*hd, 2d]: head copies along dim 0
    return {"ffn hidden": (w1[:32] - w1[32:]).abs().max().item(),
            "embedding": (emb[:, :16] - emb[:, 16:]).abs().max().item(),
            "heads": (wq[:16] - wq[16:]).abs().max().item()}


def test_without_noise_copies_stay_bitwise_identical(trained_without_and_with_noise):
    clean, _ = trained_without_and_with_noise
    assert copy_gaps(clean) == {"ffn hidden": 0.0, "embedding": 0.0, "heads": 0.0}


def test_noise_lets_copies_diverge(trained_without_and_with_noise):
    _, noisy = trained_without_and_with_noise
    gaps = copy_gaps(noisy)
    assert all(gap > 1e-4 for gap in gaps.values()), gaps


# 10. grad_scale ----------------------------------------------------------------------------------------------------

def gradients(model: GPT, x: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    F.cross_entropy(model(x).flatten(0, 1), target.flatten()).backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("old, new", [
    (BASE, shape(d_model=32, n_heads=8, n_kv_heads=4, ffn_hidden=64)),
    (shape(moe=moe(top_k=2, every=2, shared_expert_hidden=16)),
     shape(d_model=32, n_heads=8, n_kv_heads=4, ffn_hidden=64,
           moe=moe(top_k=2, every=2, expert_hidden=64, shared_expert_hidden=32))),
], ids=["dense", "moe"])
def test_grad_scale_matches_real_gradients(old, new):
    before, after, recipes = grow(old, new, ops())
    x, target = tokens(seed=1), tokens(seed=2)
    old_grads, new_grads = gradients(before, x, target), gradients(after, x, target)
    assert set(new_grads) <= set(recipes)
    for key, grad in new_grads.items():
        recipe = recipes[key]
        expected = apply_steps(old_grads[recipe.source], recipe.steps) * recipe.grad_scale
        tolerance = 1e-4 * expected.abs().max().item() + 1e-12
        assert (grad - expected).abs().max().item() <= tolerance, (key, recipe.note)


# 11. Purity -------------------------------------------------------------------------------------------------------

PURITY_OLD = BASE  # dense: the MoE layers are upcycled (fresh routers) and get fresh shared experts
PURITY_NEW = shape(n_layers=4, d_model=32, n_heads=8, n_kv_heads=4, ffn_hidden=64,
                   moe=moe(top_k=2, every=2, expert_hidden=64, shared_expert_hidden=16))
PURITY_OPS = ops(depth="stack", noise=0.01, router_std=0.02)


def test_building_keys_in_any_order_or_subset_matches_apply_growth():
    state = old_model(PURITY_OLD).state_dict()
    rng_state = torch.random.get_rng_state()
    reference = apply_growth(state, PURITY_OLD, PURITY_NEW, PURITY_OPS, seed=5, stage="grow1")
    assert torch.equal(torch.random.get_rng_state(), rng_state)  # no draw from the global generator
    recipes = growth_map(PURITY_OLD, PURITY_NEW, PURITY_OPS)
    assert any(r.source is None and r.fresh_std for r in recipes.values())  # fresh draws are covered too
    for trial in range(3):
        keys = list(recipes)
        random.Random(trial).shuffle(keys)
        subset = keys[: len(keys) // (trial + 1)]
        for key in subset:
            recipe = recipes[key]
            built = build_weight(recipe, state[recipe.source] if recipe.source else None, key, 5, "grow1",
                                 PURITY_OPS.noise)
            assert torch.equal(built, reference[key]), key


def test_noise_depends_on_seed_and_stage_only():
    state = old_model(PURITY_OLD).state_dict()
    recipes = growth_map(PURITY_OLD, PURITY_NEW, PURITY_OPS)
    key = "layers.2.attention.wq.weight"
    recipe = recipes[key]
    assert recipe.copy_axis == 1

    def build(seed, stage):
        return build_weight(recipe, state[recipe.source], key, seed, stage, 0.01)

    assert torch.equal(build(5, "grow1"), build(5, "grow1"))
    assert not torch.equal(build(5, "grow1"), build(5, "grow2"))
    assert not torch.equal(build(5, "grow1"), build(6, "grow1"))
    router = "layers.1.feed_forward.router.gate.weight"
    assert recipes[router].source is None
    first = build_weight(recipes[router], None, router, 5, "grow1", 0.0)
    assert torch.equal(first, build_weight(recipes[router], None, router, 5, "grow1", 0.0))
    assert not torch.equal(first, build_weight(recipes[router], None, "layers.3.feed_forward.router.gate.weight",
                                               5, "grow1", 0.0))


def test_fresh_draws_use_their_own_seeded_generator():
    recipes = growth_map(PURITY_OLD, PURITY_NEW, PURITY_OPS)
    for key, op, std in [("layers.3.feed_forward.router.gate.weight", "router", PURITY_OPS.router_std),
                         ("layers.1.feed_forward.shared_expert.w1.weight", "fresh", PURITY_NEW.init_std)]:
        recipe = recipes[key]
        expected = torch.randn(recipe.shape, generator=key_generator(5, "grow1", op, key)) * std
        assert torch.equal(build_weight(recipe, None, key, 5, "grow1", 0.01), expected), key


def test_recipes_are_plain_data():
    first = growth_map(PURITY_OLD, PURITY_NEW, PURITY_OPS)
    assert pickle.loads(pickle.dumps(first)) == first == growth_map(PURITY_OLD, PURITY_NEW, PURITY_OPS)


# 12. Optimizer moments ------------------------------------------------------------------------------------------

def test_build_moment_scales_by_grad_scale_and_zeroes_new_tensors():
    new = shape(n_layers=4, ffn_hidden=64)
    recipes = growth_map(BASE, new, ops(depth="identity"))
    g = torch.Generator().manual_seed(0)
    moment = torch.randn(32, 16, generator=g)
    w1 = recipes["layers.0.feed_forward.w1.weight"]
    exp_avg = build_moment(w1, moment, "exp_avg")
    assert torch.equal(exp_avg, torch.cat([moment, moment]) * 0.5)
    assert torch.equal(build_moment(w1, moment, "exp_avg_sq"), torch.cat([moment, moment]) * 0.25)
    w2 = recipes["layers.0.feed_forward.w2.weight"]
    sq = torch.rand(16, 32, generator=g)
    assert torch.equal(build_moment(w2, sq, "exp_avg_sq"), torch.cat([sq, sq], dim=1))
    zeroed = recipes["layers.1.feed_forward.w2.weight"]
    assert zeroed.scale == 0.0
    assert torch.equal(build_moment(zeroed, sq, "exp_avg"), torch.zeros(16, 64))
    with pytest.raises(ValueError, match="moment kind"):
        build_moment(w1, moment, "momentum")
    fresh_gate = growth_map(BASE, shape(moe=moe()), ops())["layers.0.feed_forward.router.gate.weight"]
    assert torch.equal(build_moment(fresh_gate, None, "exp_avg"), torch.zeros(4, 16))


# 7. The gated (Qwen2-MoE) shared expert -----------------------------------------------------------------------

def test_a_gated_shared_expert_grows_exactly_in_width_and_hidden():
    old = shape(moe=moe(top_k=2, every=2, shared_expert_hidden=16, shared_expert_gate=True))
    new = shape(d_model=32, n_heads=8, n_kv_heads=4,
                moe=moe(top_k=2, every=2, expert_hidden=64, shared_expert_hidden=32, shared_expert_gate=True))
    recipes = assert_exact(old, new, ops(noise=0.01))
    gate = recipes["layers.1.feed_forward.shared_expert.gate.weight"]
    assert gate.shape == (1, 32) and (gate.scale, gate.copy_axis) == (0.5, 1)


def test_a_new_gated_shared_expert_is_exact():
    assert_exact(shape(moe=moe(top_k=2, every=2)),
                 shape(moe=moe(top_k=2, every=2, shared_expert_hidden=16, shared_expert_gate=True)), ops())
