"""Mixed precision the FSDP2 way (ppmoe/parallel/mixed_precision.py), in real gloo runs on CPU.

gloo reduces bf16 on CPU (all-gather, reduce-scatter and all-reduce: torch 2.13), so bf16 compute with
an fp32 or a bf16 gradient reduction runs here as on GPUs; only its speed is not representative.

Tolerances:
- fp32 path (train.dtype fp32): FSDP dp=2 against one process as tests/test_parallel_equivalence.py
  (losses and grad norms 1e-5 relative, gradients 5e-4 of their tensor's largest entry: summation order
  only). No policy and no wrapper at dp=1, so the path is the one before mixed precision existed (bit
  for bit against the commit before mixed precision (655e76d), checked by hand: losses, grad norms and
  final weights of one process, FSDP and DDP dp=2, TP=2, PP=2, and MoE alone / all-to-all / experts_in_tp).
- bf16 layouts against the bf16 single-process run (the 1-rank FSDP wrapper): the same casts, so only
  fp32 summation order differs (measured ~1e-7 relative), which could be amplified where an updated fp32
  weight rounds to another bf16 value: BF16_LAYOUT_RTOL (1e-4) on losses and grad norms. A bf16 gradient
  reduction rounds every reduced gradient: 4 x 2^-8 (grad norms moved 1% by step 3: AdamW normalises
  the rounded small gradients).
- bf16 PP=2 against bf16 one process: bit for bit (the same ops on the same micro-batches); bf16 TP=2:
  4 x 2^-8 (row-parallel partial sums are rounded to bf16 before their all-reduce; measured 2^-8 on a
  grad norm).
- bf16 against fp32: BF16_EPS (2^-8, bf16's machine epsilon) relative on the losses of 3 steps.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.fsdp import MixedPrecisionPolicy

from multiproc import run_ranks
from ppmoe.moe.router import TopKRouter
from ppmoe.parallel.mixed_precision import FULL_PRECISION, Precision, resolve_precision
from test_parallel_equivalence import STEPS, full_grads, tiny_config

BF16_EPS = 2.0 ** -8
BF16_LAYOUT_RTOL = 1e-4
GRAD_TOL = 5e-4
MOE = ["moe.num_experts=4", "moe.top_k=2", "moe.shared_expert_hidden=32"]


def train_and_inspect(dataset_dir, output_dir, overrides):
    """Train STEPS steps; rank 0 reports losses, grad norms, full gradients and what it saw: the dtypes of
    the parameters, their gradients, AdamW's moments, a block's output, the logits, the routing weights and
    the experts' output, and of every tensor FSDP2/replicate all-gathered and reduced."""
    import torch.distributed as dist

    from ppmoe.moe import GroupedExperts, TopKRouter as Router
    from ppmoe.train import Trainer
    from ppmoe.train.metrics import read_metrics

    seen = {"all_gather": set(), "reduce_scatter": set(), "all_reduce": set()}

    def recording(name, collective, position, keyword):
        def call(*args, **kwargs):
            seen[name].add((args[position] if len(args) > position else kwargs[keyword]).dtype)
            return collective(*args, **kwargs)
        return call

    # FSDP2 calls these through the torch.distributed module at call time (fsdp/_fully_shard/_fsdp_collectives.py)
    dist.all_gather_single = recording("all_gather", dist.all_gather_single, 1, "input_tensor")
    dist.reduce_scatter_single = recording("reduce_scatter", dist.reduce_scatter_single, 1, "input")
    dist.all_reduce = recording("all_reduce", dist.all_reduce, 0, "tensor")

    trainer = Trainer(tiny_config(dataset_dir, output_dir, overrides))
    outputs = {}
    for part in trainer.current.runner.parts:
        first = part.layers[next(iter(part.layers))]
        first.register_forward_hook(lambda m, i, out: outputs.__setitem__("block", out.dtype))
        # after the wrapper's own pre-forward hook: what the block computes with
        first.register_forward_pre_hook(lambda m, args: outputs.__setitem__("rope", args[1].dtype))
        if part.output is not None:
            part.output.register_forward_hook(lambda m, i, out: outputs.__setitem__("logits", out.dtype))
        for module in part.modules():
            if isinstance(module, Router):
                module.register_forward_hook(lambda m, i, out: outputs.__setitem__("routing", out.weights.dtype))
            if isinstance(module, GroupedExperts):
                module.register_forward_hook(lambda m, i, out: outputs.__setitem__("experts", out.dtype))
    trainer.fit()
    model, optimizer = trainer.model, trainer.optimizer
    report = {
        "params": {p.dtype for p in model.parameters()},
        "grads": {p.grad.dtype for p in model.parameters()},
        "moments": {state[key].dtype for state in optimizer.state.values() for key in ("exp_avg", "exp_avg_sq")},
        "outputs": outputs, "collectives": seen,
        "wrapped": type(model).__name__ != "GPT",
        "grads_full": full_grads(model),
    }
    if dist.get_rank() != 0:
        return None
    metrics = read_metrics(f"{output_dir}/metrics.jsonl")
    report["losses"] = [metrics[s]["loss"] for s in range(1, STEPS + 1)]
    report["grad_norms"] = [metrics[s]["grad_norm"] for s in range(1, STEPS + 1)]
    return report


def run(world, dataset, tmp_path, name, overrides):
    return run_ranks(train_and_inspect, world, dataset, str(tmp_path / name), overrides)[0]


def assert_same_training(got, ref, rtol, grad_tol=None):
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=rtol, atol=0)
    torch.testing.assert_close(torch.tensor(got["grad_norms"]), torch.tensor(ref["grad_norms"]), rtol=rtol, atol=0)
    if grad_tol is not None:
        assert got["grads_full"].keys() == ref["grads_full"].keys()
        for name, g in ref["grads_full"].items():
            torch.testing.assert_close(got["grads_full"][name], g, rtol=0, atol=grad_tol * g.abs().max().item(),
                                       msg=lambda m: f"gradient of {name}: {m}")


@pytest.fixture(scope="module")
def fp32_reference(tiny_dataset, tmp_path_factory):
    return run(1, tiny_dataset, tmp_path_factory.mktemp("fp32"), "ref", ["train.dtype=fp32"])


@pytest.fixture(scope="module")
def bf16_reference(tiny_dataset, tmp_path_factory):
    return run(1, tiny_dataset, tmp_path_factory.mktemp("bf16"), "ref", ["train.dtype=bf16"])


# ---- (a) the fp32 path

def test_fp32_path_is_unwrapped_at_one_rank_and_fsdp_dp2_matches_it(fp32_reference, tiny_dataset, tmp_path):
    ref = fp32_reference
    assert not ref["wrapped"], "fp32 at dp=1 must not wrap the model"
    assert ref["losses"][-1] < ref["losses"][0]
    got = run(2, tiny_dataset, tmp_path, "dp2", ["train.dtype=fp32", "parallel.dp_type=fsdp"])
    assert got["wrapped"]
    assert got["collectives"]["all_gather"] == {torch.float32}
    assert got["collectives"]["reduce_scatter"] == {torch.float32}
    assert got["outputs"]["block"] == got["outputs"]["logits"] == torch.float32
    assert_same_training(got, ref, rtol=1e-5, grad_tol=GRAD_TOL)


# ---- (b) bf16 compute, fp32 master weights, fp32 or bf16 reduction

def assert_fp32_state_bf16_compute(report):
    assert report["params"] == {torch.float32}, "master weights must stay fp32"
    assert report["grads"] == {torch.float32}, "gradients must land in fp32"
    assert report["moments"] == {torch.float32}, "AdamW's moments must be fp32"
    assert report["outputs"]["block"] == torch.bfloat16
    # (rank 0 of a pipeline holds no head)
    assert report["outputs"].get("logits", torch.bfloat16) == torch.bfloat16
    assert report["outputs"]["rope"] == torch.float32, "the RoPE tables must reach the blocks in fp32"


def test_bf16_single_process_is_the_1_rank_fsdp_wrapper(bf16_reference, fp32_reference):
    ref = bf16_reference
    assert ref["wrapped"], "bf16 at dp=1 runs through the data-parallel wrapper (it is what casts)"
    assert_fp32_state_bf16_compute(ref)
    assert ref["collectives"]["reduce_scatter"] == set()  # one rank: FSDP2 copies instead of reducing
    assert ref["losses"] != fp32_reference["losses"], "bf16 compute must actually change the numbers"
    torch.testing.assert_close(torch.tensor(ref["losses"]), torch.tensor(fp32_reference["losses"]),
                               rtol=BF16_EPS, atol=0)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_bf16_with_activation_checkpointing_is_bit_exact(mode, bf16_reference, tiny_dataset, tmp_path):
    """The recompute sees the same bf16 copies the forward did (FSDP2 gathers and casts before the
    block's backward): the same losses and gradient norms as bf16 without checkpointing, bit for bit."""
    got = run(1, tiny_dataset, tmp_path, mode, ["train.dtype=bf16", f"train.activation_checkpointing={mode}"])
    assert_fp32_state_bf16_compute(got)
    assert_same_training(got, bf16_reference, rtol=0)


@pytest.mark.parametrize("reduce_dtype", ["fp32", "bf16"])
def test_bf16_fsdp_dp2(reduce_dtype, bf16_reference, fp32_reference, tiny_dataset, tmp_path):
    got = run(2, tiny_dataset, tmp_path, "dp2", ["train.dtype=bf16", f"train.reduce_dtype={reduce_dtype}"])
    assert_fp32_state_bf16_compute(got)
    wire = {"fp32": torch.float32, "bf16": torch.bfloat16}[reduce_dtype]
    assert got["collectives"]["all_gather"] == {torch.bfloat16}, "parameters are gathered in bf16"
    assert got["collectives"]["reduce_scatter"] == {wire}
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(fp32_reference["losses"]),
                               rtol=BF16_EPS, atol=0)
    if reduce_dtype == "fp32":  # the same casts as one process: summation order only
        assert_same_training(got, bf16_reference, rtol=BF16_LAYOUT_RTOL)
    else:  # rounded sums: visibly different, still bf16-close
        assert got["grad_norms"] != bf16_reference["grad_norms"]
        assert_same_training(got, bf16_reference, rtol=4 * BF16_EPS)


def test_bf16_ddp_dp2_casts_through_replicate(bf16_reference, tiny_dataset, tmp_path):
    got = run(2, tiny_dataset, tmp_path, "ddp", ["train.dtype=bf16", "parallel.dp_type=ddp"])
    assert got["wrapped"]
    assert_fp32_state_bf16_compute(got)
    assert_same_training(got, bf16_reference, rtol=BF16_LAYOUT_RTOL)


def test_bf16_moe_alltoall_experts_run_in_bf16(tiny_dataset, tmp_path):
    """The all-to-all layout hands each rank's experts to it alone: the wrapper ignores (does not cast)
    them, the experts follow their bf16 input; routing stays fp32."""
    ref = run(1, tiny_dataset, tmp_path, "ref", [*MOE, "train.dtype=bf16"])
    got = run(2, tiny_dataset, tmp_path, "a2a", [*MOE, "train.dtype=bf16", "moe.dispatcher=alltoall"])
    for report in (ref, got):
        assert_fp32_state_bf16_compute(report)
        assert report["outputs"]["experts"] == torch.bfloat16
        assert report["outputs"]["routing"] == torch.float32
    assert_same_training(got, ref, rtol=BF16_LAYOUT_RTOL)


@pytest.mark.parametrize("layout, overrides, rtol", [
    # the same ops on the same micro-batches, split over two processes: bit for bit (measured)
    ("pp2", ["parallel.pp=2", "model.tie_embeddings=false"], 0.0),
    # tied embedding over two stages: one process sums the head's and the embedding's gradient in one
    # bf16 weight's backward, two stages each reduce theirs to fp32 and all-reduce: bf16-close
    ("pp2_tied", ["parallel.pp=2", "model.tie_embeddings=true"], 4 * BF16_EPS),
    # row-parallel partial sums are rounded to bf16 before their all-reduce (one process rounds the full
    # sum once): bf16-close
    ("tp2", ["parallel.tp=2"], 4 * BF16_EPS),
    # sequence parallel: the same bf16 rounding, at reduce-scatter instead of all-reduce
    ("tp2_sp", ["parallel.tp=2", "parallel.sequence_parallel=true"], 4 * BF16_EPS),
])
def test_bf16_tensor_and_pipeline_parallel(layout, overrides, rtol, tiny_dataset, tmp_path):
    """Every part of a TP or PP run is wrapped over its 1-rank dp mesh and computes in bf16 like one process."""
    ref_overrides = {"pp2": ["model.tie_embeddings=false"], "pp2_tied": ["model.tie_embeddings=true"]}.get(layout, [])
    ref = run(1, tiny_dataset, tmp_path, "ref", ["train.dtype=bf16", *ref_overrides])
    got = run(2, tiny_dataset, tmp_path, layout, ["train.dtype=bf16", *overrides])
    assert got["wrapped"]
    assert_fp32_state_bf16_compute(got)
    assert_same_training(got, ref, rtol=rtol)


def test_bf16_checkpoint_holds_fp32_weights_and_moments(tiny_dataset, tmp_path):
    """What a bf16 run saves is its fp32 state: master weights and AdamW's moments (DCP's metadata)."""
    import torch.distributed.checkpoint as dcp

    from ppmoe.train.checkpoint import complete_checkpoints

    out = tmp_path / "ckpt"
    run_ranks(train_and_inspect, 2, tiny_dataset, str(out), ["train.dtype=bf16", "checkpoint.save_final=true"])
    (saved,) = complete_checkpoints(out / "checkpoints")
    stored = dcp.FileSystemReader(str(saved)).read_metadata().state_dict_metadata
    weights = {k: m.properties.dtype for k, m in stored.items() if k.startswith("model.")}
    moments = {k: m.properties.dtype for k, m in stored.items() if k.endswith((".exp_avg", ".exp_avg_sq"))}
    assert weights and moments
    assert set(weights.values()) == set(moments.values()) == {torch.float32}


# ---- precision kept in fp32 inside the bf16 model

def test_router_decides_in_fp32_under_bf16_weights():
    """Two experts whose logits differ by 2^-10, below bf16's resolution at 1.0 (2^-7): rounding the logits
    to bf16 would tie them (and top-1 would pick expert 0); the fp32 gate matmul picks expert 1."""
    router = TopKRouter(2, 2, 1)
    with torch.no_grad():
        router.gate.weight.copy_(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    router = router.to(torch.bfloat16)  # what FSDP2's param_dtype hands the forward
    x = torch.tensor([[1.0, 2.0 ** -10]], dtype=torch.bfloat16)
    routing = router(x)
    assert routing.weights.dtype == torch.float32
    assert routing.expert_ids.tolist() == [[1]]
    rounded = F.linear(x, router.gate.weight).float()  # the bf16 matmul the router avoids
    assert rounded[0, 0] == rounded[0, 1]


def test_rms_norm_normalises_in_fp32_and_rounds_once():
    torch.manual_seed(0)
    x, w = (3 * torch.randn(16, 48)).bfloat16(), (1 + 0.1 * torch.randn(48)).bfloat16()
    xf = x.float()
    expected = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5) * w.float()).bfloat16()
    assert torch.equal(F.rms_norm(x, (48,), w, 1e-5), expected)


def test_loss_is_fp32_on_bf16_logits():
    from ppmoe.model.loss import cross_entropy

    logits = torch.randn(2, 3, 11).bfloat16()
    targets = torch.randint(0, 11, (2, 3))
    loss = cross_entropy(logits, targets)
    assert loss.dtype == torch.float32
    assert torch.equal(loss, F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()))


# ---- (c) the policy objects and the config's rules

@pytest.mark.parametrize("dtype, reduce, device, compute, wire", [
    ("fp32", "fp32", "cuda", torch.float32, torch.float32),
    ("auto", "fp32", "cpu", torch.float32, torch.float32),
    ("auto", "bf16", "cpu", torch.float32, torch.float32),  # auto is fp32 on CPU: nothing to reduce in bf16
    ("auto", "fp32", "cuda", torch.bfloat16, torch.float32),
    ("auto", "bf16", "cuda", torch.bfloat16, torch.bfloat16),
    ("bf16", "fp32", "cpu", torch.bfloat16, torch.float32),
])
def test_resolve_precision(dtype, reduce, device, compute, wire):
    assert resolve_precision(dtype, reduce, device) == Precision(compute, wire)


def test_policy_objects():
    assert FULL_PRECISION.policy() == MixedPrecisionPolicy()  # fp32: FSDP2's default, no casts at all
    assert not FULL_PRECISION.mixed
    policy = Precision(torch.bfloat16, torch.float32).policy()
    assert (policy.param_dtype, policy.reduce_dtype, policy.output_dtype) == (torch.bfloat16, torch.float32, None)
    assert not policy.cast_forward_inputs  # the RoPE tables stay fp32
    assert Precision(torch.bfloat16, torch.bfloat16).policy().reduce_dtype == torch.bfloat16


def test_config_refuses_a_bf16_reduction_of_fp32_compute():
    from ppmoe.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="train.reduce_dtype=bf16 applies to bf16 compute"):
        load_config(None, ["train.dtype=fp32", "train.reduce_dtype=bf16"])
    load_config(None, ["train.dtype=bf16", "train.reduce_dtype=bf16"])
    load_config(None, ["train.dtype=auto", "train.reduce_dtype=bf16"])  # bf16 on GPU
