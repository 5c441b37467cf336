"""Parallel token dispatchers against the single-process `local` MoE layer, on real gloo processes.

pipeline (Pipeline-MoE): every TP rank sees the SAME tokens and holds whole experts (expert weights are
DTensors sharded on dim 0 over a 1-D mesh). Each rank must reproduce the local module exactly: output,
input gradient, every parameter gradient (expert grads gathered with `.full_tensor()`), and the aux/z
loss values and token counts the layer records in `stats`.

alltoall (classic expert parallelism): each rank holds DIFFERENT tokens (its data-parallel shard). The
ranks together must reproduce the local module applied to each rank's chunk separately: concatenated
outputs and input gradients equal; expert gradients equal the local gradients accumulated over all
chunks; the router (and shared expert) gradients SUMMED over ranks equal the accumulated local ones
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
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from multiproc import run_ranks
from ppmoe.moe import MoEFeedForward, MoEShape
from ppmoe.moe.dispatch import AllToAllDispatcher, PipelineDispatcher

ATOL = 1e-5
D = 16
DROPPING_CF = 0.5  # capacity = ceil(0.5 * T * k / E): at most half the assignments fit, so some drop
DISPATCHERS = {"pipeline": PipelineDispatcher, "alltoall": AllToAllDispatcher}


def make_shape(num_experts, top_k, capacity_factor, kernel, shared):
    return MoEShape(num_experts=num_experts, top_k=top_k, expert_hidden=24, capacity_factor=capacity_factor,
                    shared_expert_hidden=20 if shared else 0, expert_kernel=kernel,
                    aux_loss_coef=0.3, z_loss_coef=0.05)  # large, so the aux path shows in the router grad


def build(shape, collapse=False):
    """The same module in every process (fixed seed). collapse: gate weights that send every token of a
    positive input to expert 0 first and expert 1 second."""
    torch.manual_seed(0)
    m = MoEFeedForward(D, shape)
    m.experts.init_weights(0.3, 0.3)
    if collapse:
        with torch.no_grad():
            m.router.gate.weight.zero_()
            m.router.gate.weight[0] = 1.0
            m.router.gate.weight[1] = 0.5
    m.loss_scale = 0.5
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
    mesh = init_device_mesh("cpu", (ws,))
    out = []
    for shape, x, r, collapse in cases:
        m = build(shape, collapse)
        for name in ("w1", "w2", "w3"):
            w = getattr(m.experts, name)
            setattr(m.experts, name, torch.nn.Parameter(distribute_tensor(w.data, mesh, [Shard(0)])))
        m.dispatch = DISPATCHERS[kind](mesh.get_group(), shape.num_experts)
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


def pipeline_reference(shape, x, r, collapse=False):
    m = build(shape, collapse)
    res = run_module(m, x, r)
    res["grads"] = local_grads(m)
    return res


def alltoall_reference(shape, x, r, ws, collapse=False):
    """The local module on each rank's chunk separately, gradients accumulated over the chunks."""
    m = build(shape, collapse)
    per_chunk = [run_module(m, xc, rc) for xc, rc in zip(x.chunk(ws), r.chunk(ws))]
    return per_chunk, local_grads(m)


def check_pipeline(results, ref, label):
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
                assert_close(res["grads"][n], g, f"{label} rank {rank} grad {n}")
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


PIPELINE_LAYOUTS = [(2, 4), (4, 4), (4, 8)]  # (world size, num_experts): 2, 1 and 2 experts per rank


@pytest.mark.parametrize("kernel", ["padded_bmm", "loop", "grouped_mm"])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("ws,num_experts", PIPELINE_LAYOUTS)
def test_pipeline_matches_local(ws, num_experts, top_k, kernel):
    x, r = inputs(2)
    shapes = [make_shape(num_experts, top_k, cf, kernel, shared)
              for cf, shared in itertools.product([None, DROPPING_CF], [False, True])]
    results = run_ranks(_worker, ws, "pipeline", [(s, x, r, False) for s in shapes], timeout=120)
    for i, shape in enumerate(shapes):
        ref = pipeline_reference(shape, x, r)
        assert_dropping_as_configured(shape, [ref])
        check_pipeline([per_rank[i] for per_rank in results], ref, label_of("pipeline", ws, shape))


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


@pytest.mark.parametrize("kind,ws", [("pipeline", 2), ("pipeline", 4), ("alltoall", 2), ("alltoall", 4)])
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
        if kind == "pipeline":
            ref = pipeline_reference(shape, x, r, collapse=True)
            check_pipeline(per_rank, ref, label)
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


def _divisibility_worker(num_experts):
    dist.init_process_group("gloo")
    group = init_device_mesh("cpu", (dist.get_world_size(),)).get_group()
    messages = []
    for cls in (PipelineDispatcher, AllToAllDispatcher):
        try:
            cls(group, num_experts)
        except ValueError as e:
            messages.append(str(e))
        else:
            messages.append(None)
    cls(group, num_experts + 1)  # divisible: accepted
    return messages


def test_num_experts_not_divisible_by_group_raises():
    for messages in run_ranks(_divisibility_worker, 2, 3, timeout=60):
        for msg in messages:
            assert msg is not None, "no ValueError for 3 experts over 2 ranks"
            assert "moe.num_experts=3" in msg
