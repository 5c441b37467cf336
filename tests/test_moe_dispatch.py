"""Parallel expert layouts against the single-process `local` MoE layer, on real gloo processes. Each
layout is the object training uses: built by `build_expert_layout` from the layout's name and a
('pp', 'dp', 'tp') mesh, handed to the layer, and asked to place the expert weights (`distribute`).

experts_in_tp (Pipeline-MoE): every TP rank sees the SAME tokens and holds whole experts (expert weights
are DTensors sharded on dim 0 over the TP mesh). Each rank must reproduce the local module exactly: output,
input gradient, every parameter gradient (expert grads gathered with `.full_tensor()`), and the aux/z
loss values and token counts the layer records in `stats`.

alltoall (classic expert parallelism): each rank holds DIFFERENT tokens (its data-parallel shard). The
ranks together must reproduce the local module applied to each rank's chunk separately: concatenated
outputs and input gradients equal; expert gradients equal the local gradients accumulated over all
chunks divided by the number of ranks (the layout's gradient hook: data parallelism averages the loss,
and skips these experts, which one rank owns each); the router (and shared expert) gradients SUMMED over ranks equal the accumulated local ones
(each rank's replicated router only sees its own tokens, a DP all-reduce would sum them).

The objective is (y * R).sum() for a fixed random R, plus the aux and z losses the layer attaches to its
output in training mode, so the router gradient includes the aux-loss path.

Tolerance: fp32 on CPU, atol 1e-5 (rtol 0): the only differences are summation order in the
all-reduces and in accumulating gradients.
"""

import itertools

import pytest
import torch
import torch._dynamo  # noqa: F401  (imported lazily by DTensor; once here, not in every forked rank: ~2 s each)
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from multiproc import run_ranks
from ppmoe.moe import MoEFeedForward, MoEShape, build_expert_layout
from ppmoe.moe.layout import LOCAL_EXPERTS, AllToAllExperts, ExpertsInTP

ATOL = 1e-5
D = 16
DROPPING_CF = 0.5  # capacity = ceil(0.5 * T * k / E): at most half the assignments fit, so some drop
# layout -> (its mesh as (pp, dp, tp) sizes for a world of ws, the class the factory must give there)
LAYOUTS = {"experts_in_tp": (lambda ws: (1, 1, ws), ExpertsInTP), "alltoall": (lambda ws: (1, ws, 1), AllToAllExperts)}


def make_shape(num_experts, top_k, capacity_factor, kernel, shared):
    return MoEShape(num_experts=num_experts, top_k=top_k, expert_hidden=24, capacity_factor=capacity_factor,
                    shared_expert_hidden=20 if shared else 0, expert_kernel=kernel,
                    aux_loss_coef=0.3, z_loss_coef=0.05)  # large, so the aux path shows in the router grad


def build(shape, collapse=False, layout=LOCAL_EXPERTS):
    """The same module in every process (fixed seed). collapse: gate weights that send every token of a
    positive input to expert 0 first and expert 1 second."""
    torch.manual_seed(0)
    m = MoEFeedForward(D, shape, layout, aux_loss_scale=0.5)
    m.experts.init_weights(0.3, 0.3)
    if collapse:
        with torch.no_grad():
            m.router.gate.weight.zero_()
            m.router.gate.weight[0] = 1.0
            m.router.gate.weight[1] = 0.5
    return m.train()


def inputs(batch, collapse=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    if collapse:
        x = torch.rand(batch, 8, D, generator=g) + 0.1  # positive: logit_0 > logit_1 > logit_2.. = 0
    else:
        x = torch.randn(batch, 8, D, generator=g)
    return x, torch.randn(batch, 8, D, generator=g)


def run_module(m, x, r):
    """One forward/backward of the objective; returns output, input grad and the recorded stats."""
    m.stats.reset()
    xx = x.clone().requires_grad_()
    y = m(xx)
    (y * r).sum().backward()
    m.stats.commit()  # fold the pending per-forward record into the totals
    s = m.stats
    return dict(y=y.detach(), xgrad=xx.grad, aux=s.aux_loss.clone(), z=s.z_loss.clone(),
                tokens_per_expert=s.tokens_per_expert.clone(), assignments=s.assignments)


def local_grads(m):
    return {n: p.grad.detach().clone() for n, p in m.named_parameters()}


def _worker(kind, cases):
    """cases: [(shape, x, r, collapse)]; x, r are the full tensors (alltoall takes this rank's chunk)."""
    dist.init_process_group("gloo")
    ws, rank = dist.get_world_size(), dist.get_rank()
    sizes, cls = LAYOUTS[kind]
    mesh = init_device_mesh("cpu", sizes(ws), mesh_dim_names=("pp", "dp", "tp"))
    out = []
    for shape, x, r, collapse in cases:
        layout = build_expert_layout(kind, mesh, shape.num_experts)
        assert type(layout) is cls, f"{kind} on {sizes(ws)} gave {type(layout).__name__}"
        m = build(shape, collapse, layout)
        owned = layout.distribute(m.experts)
        layout.prepare_gradients(m.experts)
        expert_params = [getattr(m.experts, n) for n in ("w1", "w3", "w2")]
        # alltoall experts belong to one data-parallel rank each: data parallelism must leave them alone
        assert {id(p) for p in owned} == ({id(p) for p in expert_params} if kind == "alltoall" else set())
        if kind == "alltoall":
            x, r = x.chunk(ws)[rank], r.chunk(ws)[rank]
        res = run_module(m, x, r)
        grads, missing = {}, []
        for n, p in m.named_parameters():
            if p.grad is None:
                missing.append(n)
            elif isinstance(p.grad, DTensor):
                grads[n] = p.grad.full_tensor()  # collective: every rank must get here
            else:
                grads[n] = p.grad.detach().clone()
        assert not missing, f"rank {rank}: no gradient for {missing} (would hang the next collective)"
        assert all(isinstance(getattr(m.experts, n).grad, DTensor) for n in ("w1", "w2", "w3"))
        res["grads"] = grads
        out.append(res)
    return out


def assert_close(actual, expected, what):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    assert err <= ATOL, f"{what}: max abs error {err:.2e} > {ATOL}"


def experts_in_tp_reference(shape, x, r, collapse=False):
    m = build(shape, collapse)
    res = run_module(m, x, r)
    res["grads"] = local_grads(m)
    return res


def alltoall_reference(shape, x, r, ws, collapse=False):
    """The local module on each rank's chunk separately, gradients accumulated over the chunks."""
    m = build(shape, collapse)
    per_chunk = [run_module(m, xc, rc) for xc, rc in zip(x.chunk(ws), r.chunk(ws))]
    return per_chunk, local_grads(m)


def check_experts_in_tp(results, ref, label):
    for rank, res in enumerate(results):
        where = f"{label} rank {rank}"
        assert_close(res["y"], ref["y"], f"{where} output")
        assert_close(res["xgrad"], ref["xgrad"], f"{where} input grad")
        assert res["grads"].keys() == ref["grads"].keys()
        for n, g in ref["grads"].items():
            assert_close(res["grads"][n], g, f"{where} grad {n}")
        assert_close(res["aux"], ref["aux"], f"{where} aux loss")
        assert_close(res["z"], ref["z"], f"{where} z loss")
        assert torch.equal(res["tokens_per_expert"], ref["tokens_per_expert"]), where
        assert res["assignments"] == ref["assignments"], where


def check_alltoall(results, ref, label):
    per_chunk, ref_grads = ref
    assert_close(torch.cat([res["y"] for res in results]), torch.cat([c["y"] for c in per_chunk]), f"{label} output")
    assert_close(torch.cat([res["xgrad"] for res in results]), torch.cat([c["xgrad"] for c in per_chunk]),
                 f"{label} input grad")
    for rank, (res, c) in enumerate(zip(results, per_chunk)):
        assert_close(res["aux"], c["aux"], f"{label} rank {rank} aux loss")
        assert_close(res["z"], c["z"], f"{label} rank {rank} z loss")
        assert torch.equal(res["tokens_per_expert"], c["tokens_per_expert"]), f"{label} rank {rank}"
    for n, g in ref_grads.items():
        if n.startswith("experts."):  # gathered DTensor grads: the same full tensor on every rank
            for rank, res in enumerate(results):
                assert_close(res["grads"][n], g / len(results), f"{label} rank {rank} grad {n}")
        else:  # replicated parameters: each rank's grad covers its own tokens only
            assert_close(sum(res["grads"][n] for res in results), g, f"{label} summed grad {n}")


def assert_dropping_as_configured(shape, stats_list):
    kept = sum(int(s["tokens_per_expert"].sum()) for s in stats_list)
    assignments = sum(s["assignments"] for s in stats_list)
    if shape.capacity_factor is None:
        assert kept == assignments, "dropless routing dropped assignments"
    else:
        assert kept < assignments, "capacity_factor case dropped nothing: the test would not exercise drops"


def label_of(kind, ws, shape):
    return (f"{kind} ws={ws} E={shape.num_experts} k={shape.top_k} cf={shape.capacity_factor} "
            f"kernel={shape.expert_kernel} shared={shape.shared_expert_hidden}")


EXPERTS_IN_TP_LAYOUTS = [(2, 4), (4, 4), (4, 8)]  # (world size, num_experts): 2, 1 and 2 experts per rank


@pytest.mark.parametrize("kernel", ["padded_bmm", "loop", "grouped_mm"])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("ws,num_experts", EXPERTS_IN_TP_LAYOUTS)
def test_experts_in_tp_matches_local(ws, num_experts, top_k, kernel):
    x, r = inputs(2)
    shapes = [make_shape(num_experts, top_k, cf, kernel, shared)
              for cf, shared in itertools.product([None, DROPPING_CF], [False, True])]
    results = run_ranks(_worker, ws, "experts_in_tp", [(s, x, r, False) for s in shapes], timeout=120)
    for i, shape in enumerate(shapes):
        ref = experts_in_tp_reference(shape, x, r)
        assert_dropping_as_configured(shape, [ref])
        check_experts_in_tp([per_rank[i] for per_rank in results], ref, label_of("experts_in_tp", ws, shape))


ALLTOALL_LAYOUTS = [(2, 4), (4, 4), (4, 8)]


@pytest.mark.parametrize("kernel", ["padded_bmm", "loop", "grouped_mm"])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("ws,num_experts", ALLTOALL_LAYOUTS)
def test_alltoall_matches_local_per_chunk(ws, num_experts, top_k, kernel):
    x, r = inputs(4)  # 32 tokens: 16 per rank at ws=2, 8 at ws=4
    shapes = [make_shape(num_experts, top_k, cf, kernel, shared)
              for cf, shared in itertools.product([None, DROPPING_CF], [False, True])]
    results = run_ranks(_worker, ws, "alltoall", [(s, x, r, False) for s in shapes], timeout=120)
    for i, shape in enumerate(shapes):
        ref = alltoall_reference(shape, x, r, ws)
        assert_dropping_as_configured(shape, ref[0])
        check_alltoall([per_rank[i] for per_rank in results], ref, label_of("alltoall", ws, shape))


@pytest.mark.parametrize("kind,ws", [("experts_in_tp", 2), ("experts_in_tp", 4), ("alltoall", 2), ("alltoall", 4)])
def test_ranks_whose_experts_get_no_tokens(kind, ws):
    """Every token picks expert 0 first and expert 1 second, so the experts of the last rank(s) receive
    nothing. Those ranks must still take part in every collective (this used to deadlock) and return
    zero gradients for their experts."""
    num_experts = 4
    x, r = inputs(4 if kind == "alltoall" else 2, collapse=True)
    shapes = [make_shape(num_experts, k, None, kernel, False)
              for k, kernel in itertools.product([1, 2], ["padded_bmm", "loop", "grouped_mm"])]
    results = run_ranks(_worker, ws, kind, [(s, x, r, True) for s in shapes], timeout=30)
    for i, shape in enumerate(shapes):
        label = label_of(kind, ws, shape) + " collapsed"
        per_rank = [res[i] for res in results]
        if kind == "experts_in_tp":
            ref = experts_in_tp_reference(shape, x, r, collapse=True)
            check_experts_in_tp(per_rank, ref, label)
            counts, ref_grads = ref["tokens_per_expert"], ref["grads"]
        else:
            ref = alltoall_reference(shape, x, r, ws, collapse=True)
            check_alltoall(per_rank, ref, label)
            counts, ref_grads = sum(c["tokens_per_expert"] for c in ref[0]), ref[1]
        # the routing really collapsed: all assignments on experts 0..k-1, none on the last rank's experts
        total = x.shape[0] * x.shape[1]
        assert counts.tolist() == [total] * shape.top_k + [0] * (num_experts - shape.top_k), label
        last = num_experts // ws * (ws - 1)
        for n in ("experts.w1", "experts.w2", "experts.w3"):
            assert torch.count_nonzero(per_rank[-1]["grads"][n][last:]) == 0, label
            assert torch.count_nonzero(ref_grads[n][0]) > 0, label


def test_one_rank_is_the_local_layout():
    """Over a group of one rank every layout is the local one (no collectives), and so is a dense model's."""
    assert build_expert_layout("experts_in_tp", None, 4) is LOCAL_EXPERTS
    assert build_expert_layout("local", None, 4) is LOCAL_EXPERTS
    for kind in LAYOUTS:
        assert run_ranks(_one_rank_layout_worker, 2, kind, timeout=60) == [True, True]


def _one_rank_layout_worker(kind):
    """On 2 ranks split over the dimension `kind` does not use, its group has one rank."""
    dist.init_process_group("gloo")
    sizes, _ = LAYOUTS[kind]
    other = (1, 1, 2) if sizes(2) == (1, 2, 1) else (1, 2, 1)
    mesh = init_device_mesh("cpu", other, mesh_dim_names=("pp", "dp", "tp"))
    return build_expert_layout(kind, mesh, 4) is LOCAL_EXPERTS and build_expert_layout(kind, mesh, 0) is LOCAL_EXPERTS
