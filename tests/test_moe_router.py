"""MoE building blocks in one process: router losses, top-k weights, capacity, jitter, the attached aux
loss, the two expert kernels and token permutation, each against a hand computation.

Tolerance: fp32, 1e-6 absolute for hand-computed scalars and 1e-5 for whole tensors through the experts.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from ppmoe.moe import GroupedExperts, MoEFeedForward, MoEShape, TopKRouter
from ppmoe.moe.aux_loss import attach_loss
from ppmoe.moe.experts import run_experts_grouped_mm, run_experts_loop, run_experts_padded_bmm, swiglu
from ppmoe.moe.permute import combine, sort_by_expert
from ppmoe.moe.router import capacity_mask, load_balancing_loss, z_loss

ATOL = 1e-5


def close(a, b, atol=ATOL):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32),
                          atol=atol, rtol=0)


# ---------------------------------------------------------------- losses


def test_load_balancing_loss_by_hand():
    probs = torch.tensor([[0.7, 0.2, 0.1],
                          [0.1, 0.6, 0.3],
                          [0.5, 0.1, 0.4],
                          [0.2, 0.3, 0.5]])
    expert_ids = torch.tensor([[0, 1], [1, 2], [0, 2], [2, 1]])
    num_tokens, num_experts = probs.shape
    assignments = expert_ids.numel()
    expected = 0.0
    for e in range(num_experts):
        f_e = sum(int(i == e) for i in expert_ids.flatten().tolist()) / assignments
        p_e = sum(probs[t, e].item() for t in range(num_tokens)) / num_tokens
        expected += f_e * p_e
    expected *= num_experts
    # f = [2/8, 3/8, 3/8], P = [0.375, 0.3, 0.325]: 3 * (0.09375 + 0.1125 + 0.121875) = 0.984375
    assert math.isclose(expected, 0.984375, abs_tol=1e-6)
    assert close(load_balancing_loss(probs, expert_ids, num_experts), expected, 1e-6)


def test_load_balancing_loss_uniform_is_one_and_collapsed_is_larger():
    num_tokens, num_experts = 8, 4
    uniform = torch.full((num_tokens, num_experts), 1.0 / num_experts)
    balanced_ids = torch.arange(num_tokens).remainder(num_experts)[:, None]
    uniform_loss = load_balancing_loss(uniform, balanced_ids, num_experts)
    assert close(uniform_loss, 1.0, 1e-6)

    collapsed = F.one_hot(torch.zeros(num_tokens, dtype=torch.int64), num_experts).float()
    collapsed_loss = load_balancing_loss(collapsed, torch.zeros(num_tokens, 1, dtype=torch.int64), num_experts)
    assert close(collapsed_loss, num_experts, 1e-6)  # f_0 = P_0 = 1: the maximum, E
    assert collapsed_loss > uniform_loss + 1


def test_load_balancing_loss_gradient_flows_through_probs_only():
    logits = torch.randn(6, 4, requires_grad=True)
    probs = logits.softmax(-1)
    ids = probs.topk(2, dim=-1).indices
    load_balancing_loss(probs, ids, 4).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_z_loss_by_hand():
    logits = torch.tensor([[1.0, 2.0, 0.5], [-1.0, 0.0, 3.0]])
    expected = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / 2
    assert close(z_loss(logits), expected, 1e-6)


def test_router_reports_losses_with_coefficients():
    torch.manual_seed(0)
    router = TopKRouter(8, 4, 2, aux_loss_coef=0.3, z_loss_coef=0.07)
    x = torch.randn(10, 8)
    routing = router(x)
    logits = x @ router.gate.weight.t()
    probs = logits.softmax(-1)
    assert close(routing.aux_loss, 0.3 * load_balancing_loss(probs, probs.topk(2, -1).indices, 4), 1e-6)
    assert close(routing.z_loss, 0.07 * z_loss(logits), 1e-6)


# ---------------------------------------------------------------- top-k weights


@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("normalize", [True, False])
def test_topk_weights(top_k, normalize):
    torch.manual_seed(0)
    router = TopKRouter(8, 5, top_k, normalize_topk=normalize)
    x = torch.randn(12, 8)
    routing = router(x)
    probs = (x @ router.gate.weight.t()).softmax(-1)
    expected_ids = probs.topk(top_k, dim=-1).indices
    assert torch.equal(routing.expert_ids, expected_ids)
    picked = probs.gather(1, routing.expert_ids)
    if normalize and top_k > 1:
        assert close(routing.weights.sum(-1), torch.ones(12), 1e-6)
        assert close(routing.weights, picked / picked.sum(-1, keepdim=True), 1e-6)
    else:  # the raw softmax probabilities of the chosen experts (k=1 is not renormalised to 1)
        assert close(routing.weights, picked, 1e-6)
        assert (routing.weights.sum(-1) < 1 - 1e-3).all()
    assert routing.weights.requires_grad
    assert routing.keep.all() and routing.keep.shape == (12, top_k)


# ---------------------------------------------------------------- capacity


def test_capacity_mask_hand_example():
    # capacity 2, E=3, k=2. First choices: tokens 0,1 fill expert 0 (token 2 dropped), token 3 takes
    # expert 1. Second choices: token 0 -> expert 1 (2nd slot, kept), token 1 -> expert 2 (kept),
    # token 2 -> expert 1 (full, dropped), token 3 -> expert 0 (full, dropped).
    expert_ids = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0]])
    expected = torch.tensor([[True, True], [True, True], [False, False], [True, False]])
    assert torch.equal(capacity_mask(expert_ids, 3, 2), expected)


def test_capacity_mask_first_choices_before_second_choices():
    # capacity 1: token 1's FIRST choice of expert 1 beats token 0's SECOND choice of expert 1, although
    # token 0 comes first (a token-major order would give [[T, T], [F, F]]).
    expert_ids = torch.tensor([[0, 1], [1, 0]])
    assert torch.equal(capacity_mask(expert_ids, 2, 1), torch.tensor([[True, False], [True, False]]))


def test_capacity_mask_earlier_tokens_first_within_a_choice():
    expert_ids = torch.tensor([[2], [0], [2], [2], [0]])
    assert torch.equal(capacity_mask(expert_ids, 3, 2)[:, 0], torch.tensor([True, True, True, False, True]))


def test_capacity_mask_never_exceeds_capacity_and_fills_greedily():
    g = torch.Generator().manual_seed(0)
    num_experts, capacity = 5, 3
    expert_ids = torch.rand(20, num_experts, generator=g).topk(2, dim=-1).indices
    keep = capacity_mask(expert_ids, num_experts, capacity)
    kept = torch.bincount(expert_ids[keep], minlength=num_experts)
    wanted = torch.bincount(expert_ids.flatten(), minlength=num_experts)
    assert (kept <= capacity).all()
    assert torch.equal(kept, wanted.clamp(max=capacity))  # drops only what does not fit
    assert not keep.all()


def test_tokens_per_expert_counts_kept_assignments_only():
    torch.manual_seed(0)
    num_tokens, num_experts, top_k = 16, 4, 2
    router = TopKRouter(8, num_experts, top_k, capacity_factor=0.5)
    routing = router(torch.randn(num_tokens, 8))
    assert router.capacity(num_tokens) == math.ceil(0.5 * num_tokens * top_k / num_experts) == 4
    assert not routing.keep.all(), "capacity 0.5 must drop something, or this test checks nothing"
    by_hand = [0] * num_experts
    for e, k in zip(routing.expert_ids.flatten().tolist(), routing.keep.flatten().tolist()):
        by_hand[e] += int(k)
    assert routing.tokens_per_expert.tolist() == by_hand
    assert routing.tokens_per_expert.sum().item() == routing.keep.sum().item() < num_tokens * top_k
    assert (routing.tokens_per_expert <= router.capacity(num_tokens)).all()
    assert torch.equal(routing.keep, capacity_mask(routing.expert_ids, num_experts, 4))


def test_dropless_router_keeps_everything():
    torch.manual_seed(0)
    routing = TopKRouter(8, 4, 2)(torch.randn(16, 8))
    assert routing.keep.all()
    assert routing.tokens_per_expert.sum().item() == 32
    assert torch.equal(routing.tokens_per_expert, torch.bincount(routing.expert_ids.flatten(), minlength=4))


# ---------------------------------------------------------------- jitter


def make_router(jitter, seed):
    torch.manual_seed(0)  # same gate weights for every router made here
    return TopKRouter(8, 4, 2, jitter=jitter, jitter_seed=seed)


def test_jitter_is_identical_across_ranks_and_varies_across_calls():
    x = torch.randn(16, 8)
    a, b, other_seed, plain = make_router(0.2, 7), make_router(0.2, 7), make_router(0.2, 8), make_router(0.0, 7)
    first_a, first_b = a(x), b(x)
    assert torch.equal(first_a.weights, first_b.weights)  # same seed, same call count: same noise
    assert torch.equal(first_a.expert_ids, first_b.expert_ids)
    clean = plain(x)
    assert not torch.equal(first_a.weights, clean.weights)  # the noise does something
    assert not torch.equal(other_seed(x).weights, first_a.weights)  # another seed, other noise
    second_a, second_b = a(x), b(x)
    assert torch.equal(second_a.weights, second_b.weights)
    assert not torch.equal(second_a.weights, first_a.weights)  # a new call draws new noise

    a.eval()
    assert torch.equal(a(x).weights, clean.weights)  # no noise when evaluating
    assert torch.equal(a(x).weights, clean.weights)


# ---------------------------------------------------------------- attached aux loss


def test_attach_loss_gradient_equals_adding_the_loss():
    torch.manual_seed(0)
    x = torch.randn(12, 8)
    upstream = torch.randn(12, 2)

    def gate_grad(attached: bool):
        router = make_router(0.0, 0)
        router.aux_loss_coef, router.z_loss_coef = 0.5, 0.1
        routing = router(x)
        y = routing.weights * 3.0
        aux = routing.aux_loss + routing.z_loss
        if attached:
            out = attach_loss(y, aux)
            assert torch.equal(out, y)  # identity forward
            loss = (out * upstream).sum()
        else:
            loss = (y * upstream).sum() + aux
        loss.backward()
        return router.gate.weight.grad.clone()

    def main_only():
        router = make_router(0.0, 0)
        (router(x).weights * 3.0 * upstream).sum().backward()
        return router.gate.weight.grad

    attached, direct = gate_grad(True), gate_grad(False)
    assert close(attached, direct, 1e-6)
    assert (attached - main_only()).abs().max() > 1e-3  # the aux path really contributes


def test_layer_attaches_scaled_aux_loss_in_training_only():
    shape = MoEShape(num_experts=4, top_k=2, expert_hidden=12, aux_loss_coef=0.3, z_loss_coef=0.05)
    x, upstream = torch.randn(2, 5, 8), torch.randn(2, 5, 8)

    def gate_grad(train: bool, add_by_hand: bool = False):
        torch.manual_seed(0)
        m = MoEFeedForward(8, shape, aux_loss_scale=0.25)
        m.experts.init_weights(0.3, 0.3)
        m.train(train)
        y = m(x)
        loss = (y * upstream).sum()
        if add_by_hand:  # what training mode attaches, scaled by aux_loss_scale
            r = m.router(x.reshape(-1, 8))
            loss = loss + 0.25 * (r.aux_loss + r.z_loss)
        loss.backward()
        r = m.router(x.reshape(-1, 8))
        m.stats.commit()
        assert close(m.stats.aux_loss, r.aux_loss, 1e-6) and close(m.stats.z_loss, r.z_loss, 1e-6)
        return m.router.gate.weight.grad

    attached = gate_grad(True)
    assert close(attached, gate_grad(False, add_by_hand=True))
    assert (attached - gate_grad(False)).abs().max() > 1e-3  # eval mode attaches nothing


# ---------------------------------------------------------------- experts


def expert_weights(num_experts=4, d=6, hidden=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(num_experts, *shape, generator=g).mul_(0.4).requires_grad_()
            for shape in ((d, hidden), (d, hidden), (hidden, d))]


@pytest.mark.parametrize("counts", [[3, 0, 5, 1], [0, 0, 4, 0], [2, 2, 2, 2]])
def test_expert_kernels_agree(counts):
    x0 = torch.randn(sum(counts), 6)
    upstream = torch.randn(sum(counts), 6)
    results = []
    for kernel in (run_experts_loop, run_experts_padded_bmm):
        w1, w3, w2 = expert_weights()
        x = x0.clone().requires_grad_()
        out = kernel(x, counts, w1, w3, w2)
        (out * upstream).sum().backward()
        results.append((out.detach(), x.grad, w1.grad, w3.grad, w2.grad))
    for a, b in zip(*results):
        assert close(a, b)
    # and both equal the per-row reference
    w1, w3, w2 = expert_weights()
    owner = torch.repeat_interleave(torch.arange(4), torch.tensor(counts))
    for row in range(sum(counts)):
        e = owner[row]
        assert close(results[0][0][row], swiglu(x0[row:row + 1], w1[e], w3[e], w2[e])[0])
    # experts that got no rows have zero (not missing) gradients
    for e, c in enumerate(counts):
        if c == 0:
            assert all(torch.count_nonzero(g[e]) == 0 for g in results[1][2:])


@pytest.mark.parametrize("counts", [[3, 0, 5, 1], [0, 0, 4, 0], [0, 0, 0, 0]])
def test_grouped_mm_kernel_equals_the_loop(counts):
    """torch._grouped_mm needs 16-byte aligned rows (fp32: sizes divisible by 4), hence d=8, hidden=12."""
    torch.manual_seed(1)
    ws = [torch.randn(4, 8, 12), torch.randn(4, 8, 12), torch.randn(4, 12, 8)]
    x0, upstream = torch.randn(sum(counts), 8), torch.randn(sum(counts), 8)
    results = []
    for kernel in (run_experts_loop, run_experts_grouped_mm):
        weights = [w.clone().requires_grad_() for w in ws]
        x = x0.clone().requires_grad_()
        out = kernel(x, counts, *weights)
        (out * upstream).sum().backward()
        results.append((out.detach(), x.grad, *(w.grad for w in weights)))
    for a, b in zip(*results):
        assert a is not None and b is not None and torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def test_auto_kernel_needs_aligned_sizes():
    from ppmoe.moe.experts import resolve_kernel

    assert resolve_kernel("auto", "cpu", 8, 12) == "grouped_mm"
    assert resolve_kernel("auto", "cpu", 6, 12) == "padded_bmm"  # 24-byte rows: not 16-byte aligned
    assert resolve_kernel("auto", "cuda", 8, 12) == "padded_bmm"
    assert resolve_kernel("loop", "cpu", 6, 10) == "loop"


@pytest.mark.parametrize("kernel", [run_experts_padded_bmm, run_experts_loop])
def test_expert_kernels_keep_weights_in_graph_without_tokens(kernel):
    w1, w3, w2 = expert_weights()
    x = torch.zeros(0, 6, requires_grad=True)
    out = kernel(x, [0, 0, 0, 0], w1, w3, w2)
    assert out.shape == (0, 6)
    out.sum().backward()
    for w in (w1, w3, w2):
        assert w.grad is not None and w.grad.shape == w.shape
        assert torch.count_nonzero(w.grad) == 0
    assert x.grad is not None and x.grad.shape == (0, 6)


# ---------------------------------------------------------------- permutation


def routed_example(num_tokens=10, num_experts=5, top_k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    expert_ids = torch.rand(num_tokens, num_experts, generator=g).topk(top_k, dim=-1).indices
    weights = torch.rand(num_tokens, top_k, generator=g)
    return expert_ids, weights, torch.randn(num_tokens, 6, generator=g)


@pytest.mark.parametrize("dropping", [False, True])
def test_sort_and_combine_equals_per_token_loop(dropping):
    num_tokens, num_experts, top_k = 10, 5, 2
    expert_ids, weights, x = routed_example(num_tokens, num_experts, top_k)
    if dropping:
        keep = capacity_mask(expert_ids, num_experts, 2)
        assert not keep.all()
    else:
        keep = torch.ones_like(expert_ids, dtype=torch.bool)
    experts = GroupedExperts(num_experts, 6, 10, kernel="loop")
    experts.init_weights(0.4, 0.4)

    token_index, slot, counts = sort_by_expert(expert_ids, keep, 0, num_experts)
    assert sum(counts) == keep.sum().item() == len(token_index) == len(slot)
    sorted_experts = expert_ids.flatten()[slot]
    assert (sorted_experts[1:] >= sorted_experts[:-1]).all()  # grouped by expert
    assert counts == torch.bincount(expert_ids[keep], minlength=num_experts).tolist()
    got = combine(experts(x[token_index], counts), token_index, weights.flatten()[slot], num_tokens)

    expected = torch.zeros(num_tokens, 6)
    with torch.no_grad():
        for t in range(num_tokens):
            for k in range(top_k):
                if keep[t, k]:
                    e = expert_ids[t, k]
                    expected[t] += weights[t, k] * swiglu(x[t:t + 1], experts.w1[e], experts.w3[e], experts.w2[e])[0]
    assert close(got, expected)
    if dropping:  # a token whose every assignment was dropped gets zero
        fully_dropped = ~keep.any(dim=1)
        assert close(got[fully_dropped], torch.zeros(int(fully_dropped.sum()), 6))


def test_sort_by_expert_range_is_stable_and_partitions():
    expert_ids, _, _ = routed_example(num_tokens=12, num_experts=4, top_k=2, seed=3)
    keep = torch.ones_like(expert_ids, dtype=torch.bool)
    full_index, full_slot, full_counts = sort_by_expert(expert_ids, keep, 0, 4)
    parts = [sort_by_expert(expert_ids, keep, first, first + 2) for first in (0, 2)]
    # the two halves (two Pipeline-MoE ranks) together are exactly the full sort
    assert torch.equal(torch.cat([p[1] for p in parts]), full_slot)
    assert parts[0][2] + parts[1][2] == full_counts
    assert torch.equal(full_index, full_slot // 2)
    for e in range(4):  # within an expert, token order
        tokens = full_index[expert_ids.flatten()[full_slot] == e]
        assert (tokens[1:] > tokens[:-1]).all()
