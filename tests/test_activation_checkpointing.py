"""Activation checkpointing (ppmoe.parallel.activation_checkpointing) changes memory, never the numbers.

Single process, CPU fp32: the recompute runs the same kernels on the same inputs, so losses and every
gradient are equal bit for bit with checkpointing none / full / selective every 2 / selective per op, for a
dense model and an MoE model with router jitter (whose recompute must draw the same noise and record its
statistics once). Parameter names stay the plain model's, and a checkpoint written with checkpointing on
resumes with it off. Under tp2 (gloo, Pipeline-MoE experts_in_tp, jitter on; per-op) and tp2 x pp2
(1F1B, every 2nd block, and full) the checkpointed runs match the one-process run without checkpointing
to fp32 rounding (TP sums partial products in another order: losses rtol 1e-5, gradients GRAD_TOL of
each tensor's largest entry, as in test_parallel_equivalence.py).
"""

from collections import Counter

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.utils._python_dispatch import TorchDispatchMode

import ppmoe.parallel.activation_checkpointing as ac
from multiproc import run_ranks
from ppmoe.model.build import build_model, materialize, meta_model
from ppmoe.model.gpt import GPTShape
from ppmoe.moe import MoEShape
from ppmoe.parallel import apply_tensor_parallel
from ppmoe.parallel.activation_checkpointing import apply_activation_checkpointing, checkpointed_blocks
from test_parallel_equivalence import GRAD_TOL, MOE, train_and_report, train_and_report_all_ranks

MOE_SHAPE = MoEShape(num_experts=4, top_k=2, every=2, expert_hidden=32, shared_expert_hidden=16,
                     shared_expert_gate=False, normalize_topk=True, jitter=0.1, capacity_factor=None,
                     aux_loss_coef=0.01, z_loss_coef=0.001, expert_kernel="grouped_mm")
MODELS = {
    "dense": GPTShape(n_layers=4, d_model=32, n_heads=4, n_kv_heads=2, ffn_hidden=64, vocab_size=64, max_seq_len=16),
    "moe": GPTShape(n_layers=4, d_model=32, n_heads=4, n_kv_heads=2, ffn_hidden=64, vocab_size=64, max_seq_len=16,
                    moe=MOE_SHAPE),
}
MODES = {"none": ("none", 0), "full": ("full", 0), "selective_every_2": ("selective", 2),
         "selective_per_op": ("selective", 0)}


def train_steps(shape, mode, every, steps=3):
    """Losses, gradients of the last step, names and MoE side effects of `steps` SGD steps."""
    model = build_model(shape, seed=1)
    model.train()
    apply_activation_checkpointing(model, mode, every)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    # One batch, seen every step: the loss must fall (jitter still draws new noise per step).
    batch = torch.randint(0, shape.vocab_size, (2, shape.max_seq_len), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    moe_layers = [layer.feed_forward for layer in model.layers.values() if hasattr(layer.feed_forward, "stats")]
    return {"losses": torch.stack(losses),
            "grads": {name: p.grad.clone() for name, p in model.named_parameters()},
            "state_keys": list(model.state_dict().keys()),
            "jitter_calls": [m.router.jitter_calls for m in moe_layers],
            "records": [len(m.stats.pending) for m in moe_layers]}


@pytest.fixture(scope="module", params=sorted(MODELS))
def reference(request):
    return request.param, train_steps(MODELS[request.param], "none", 0)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_checkpointing_is_bit_exact(mode, reference):
    model_name, ref = reference
    got = train_steps(MODELS[model_name], *MODES[mode])
    assert ref["losses"][-1] < ref["losses"][0]  # it learns, so equal curves say something
    assert torch.equal(got["losses"], ref["losses"]), (got["losses"], ref["losses"])
    assert got["state_keys"] == ref["state_keys"]  # no wrapper prefix in any name
    for name, grad in ref["grads"].items():
        assert grad.abs().max() > 0, name
        assert torch.equal(got["grads"][name], grad), name
    # One jitter draw and one statistics record per forward, recompute or not.
    assert got["jitter_calls"] == ref["jitter_calls"] and got["records"] == ref["records"]
    if model_name == "moe":
        assert ref["jitter_calls"] == [3, 3] and ref["records"] == [3, 3]


def test_moe_recompute_without_rewind_differs(monkeypatch):
    """The rewinding is what makes the MoE recompute exact: without it the jitter counter advances in the
    recompute, the noise differs and so do the gradients (the test above could fail)."""
    ref = train_steps(MODELS["moe"], "none", 0)
    monkeypatch.setattr(ac, "moe_replay_contexts", lambda layers, inner: inner())
    got = train_steps(MODELS["moe"], "full", 0)
    assert got["jitter_calls"] != ref["jitter_calls"]
    assert any(not torch.equal(got["grads"][name], grad) for name, grad in ref["grads"].items())


def test_which_blocks_are_checkpointed():
    names = [str(i) for i in range(6)]
    assert checkpointed_blocks(names, "none", 0) == []
    assert checkpointed_blocks(names, "full", 0) == names
    assert checkpointed_blocks(names, "selective", 0) == names
    assert checkpointed_blocks(names, "selective", 2) == ["1", "3", "5"]
    # A pipeline stage holding layers 3..5 checkpoints the blocks the whole model would.
    assert checkpointed_blocks(["3", "4", "5"], "selective", 3) == ["5"]


def losses_of_run(dataset_dir, output_dir, overrides):
    from ppmoe.train import Trainer
    from test_parallel_equivalence import tiny_config

    return Trainer(tiny_config(dataset_dir, output_dir, overrides)).fit().losses


def test_checkpoint_saved_with_ac_resumes_without(tiny_dataset, tmp_path):
    """A run with full checkpointing saves step 2; a run without checkpointing resumes from it (same keys)
    and its step 3 equals the first run's bit for bit."""
    # Without jitter: its call counter is not part of a checkpoint, so a resumed run draws other noise.
    with_ac = run_ranks(losses_of_run, 1, tiny_dataset, str(tmp_path), [*MOE, "train.activation_checkpointing=full",
                                                                        "checkpoint.every=2"])[0]
    resumed = run_ranks(losses_of_run, 1, tiny_dataset, str(tmp_path), MOE)[0]
    assert sorted(with_ac) == [1, 2, 3] and sorted(resumed) == [3]
    assert resumed[3] == with_ac[3]


MOE_JITTER = [*MOE, "moe.jitter=0.1"]
# (world, reference overrides, overrides of the checkpointed run)
PARALLEL_RUNS = {
    "tp2_per_op": (2, MOE_JITTER, [*MOE_JITTER, "parallel.tp=2", "train.activation_checkpointing=selective"]),
    # sequence parallel: the recompute re-runs the layer's gather / reduce-scatter (ppmoe.moe.comm)
    "tp2_sp_full": (2, MOE_JITTER, [*MOE_JITTER, "parallel.tp=2", "parallel.sequence_parallel=true",
                                    "train.activation_checkpointing=full"]),
    # Without jitter: a pipeline run already draws other noise than one process does, checkpointing or not
    # (the schedule runs forwards of its own, which advance the jitter counter).
    "tp2_pp2_every_2": (4, [*MOE, "model.n_layers=4"],
                        [*MOE, "model.n_layers=4", "parallel.tp=2", "parallel.pp=2",
                         "train.activation_checkpointing=selective", "train.ac_every=2"]),
    "tp2_pp2_full": (4, [*MOE, "model.n_layers=4"],
                     [*MOE, "model.n_layers=4", "parallel.tp=2", "parallel.pp=2",
                      "train.activation_checkpointing=full"]),
}


@pytest.mark.parametrize("run", sorted(PARALLEL_RUNS))
def test_parallel_moe_with_checkpointing_matches_one_process(run, tiny_dataset, tmp_path):
    """Pipeline-MoE (experts_in_tp, jitter on) under TP, and TP x 1F1B pipeline, checkpointed, against the
    one-process run without checkpointing. Every rank's gradients are gathered (pipeline ranks hold
    different layers)."""
    world, ref_overrides, overrides = PARALLEL_RUNS[run]
    ref = run_ranks(train_and_report, 1, tiny_dataset, str(tmp_path / "ref"), ref_overrides)[0]
    per_rank = run_ranks(train_and_report_all_ranks, world, tiny_dataset, str(tmp_path / run), overrides)
    got = per_rank[0]
    grads = {}
    for rank_grads in per_rank:
        grads.update({k: v for k, v in rank_grads.items() if k not in ("losses", "grad_norms", "moe")})
    assert ref["losses"][-1] < ref["losses"][0]
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(got["moe"]), torch.tensor(ref["moe"]), rtol=1e-5, atol=0)
    assert sorted(grads) == sorted(ref["grads"])
    for name, grad in ref["grads"].items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=GRAD_TOL * grad.abs().max().item(),
                                   msg=lambda m: f"{run} gradient of {name}: {m}")


COLLECTIVES = {"all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all_single"}


class CountCollectives(TorchDispatchMode):
    """Counts the functional collectives (DTensor's) dispatched while active, by name."""

    def __init__(self):
        super().__init__()
        self.calls = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "_c10d_functional" and func.__name__.split(".")[0] in COLLECTIVES:
            self.calls[func.__name__] += 1
        return func(*args, **(kwargs or {}))


def backward_collectives(mode, every):
    """Functional collectives (DTensor's TP all-reduces) issued during the backward of one tp2 dense step."""
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    model = meta_model(MODELS["dense"])
    apply_tensor_parallel(model, mesh)
    apply_activation_checkpointing(model, mode, every)
    materialize(model, 1, "cpu")
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    # The local vocabulary shard of the logits is enough to need every block's backward.
    loss = model(tokens).to_local().float().pow(2).mean()
    counter = CountCollectives()
    with counter:
        loss.backward()
    return dict(counter.calls)


def test_per_op_recompute_does_not_communicate(tiny_dataset):
    """Per-op selective keeps DTensor's collective results, so its backward issues exactly the collectives of
    a backward without checkpointing; full checkpointing re-runs each block's forward all-reduces."""
    plain = run_ranks(backward_collectives, 2, "none", 0)[0]
    per_op = run_ranks(backward_collectives, 2, "selective", 0)[0]
    full = run_ranks(backward_collectives, 2, "full", 0)[0]
    assert sum(plain.values()) > 0, plain
    assert per_op == plain, (per_op, plain)
    assert sum(full.values()) > sum(plain.values()), (full, plain)
