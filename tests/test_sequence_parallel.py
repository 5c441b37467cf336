"""Sequence parallelism (`parallel.sequence_parallel: true`) against plain tensor parallelism and the
single-process reference, in real multi-process gloo runs, and its config refusals.

Each run trains the tiny GPT of test_parallel_equivalence.py (same data, seed and global batch). With SP
the residual stream, the norms, the embedding's output and the MoE layer's input and output are sequence
slices (checked: every block sees seq / tp positions); attention, the dense FFN and the output head
all-gather the sequence; the Pipeline-MoE layer (experts_in_tp, top-2, a shared expert) all-gathers its
tokens, routes them all on every rank and reduce-scatters its output (checked: its layout is
SequenceParallelExpertsInTP).

Tolerance: fp32 on CPU, where SP only changes summation order (reduce-scatters of partial sums instead
of all-reduces, the norm weights' gradients summed over the TP ranks' slices): losses and gradient norms
to 1e-5 relative (gradient norms 5e-5), MoE aux/z losses to 1e-5 relative, each gradient element to GRAD_TOL (5e-4) times the
largest entry of its tensor, as in test_parallel_equivalence.py. Nothing here is bit for bit, except SP
at tp 1, which is exactly the plain run (the key does nothing there).
"""

import signal

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from multiproc import run_ranks
from ppmoe.config import ConfigError, load_config, validate
from test_meta_build import fresh_full_params
from test_parallel_equivalence import GRAD_TOL, MOE, full_grads, tiny_config

SP = ["parallel.sequence_parallel=true"]
TP4 = ["model.n_kv_heads=4"]  # tp=4 splits the KV heads too
PP = ["model.n_layers=4"]  # pipeline stages of whole layers
PATCH = ["patch.size=4", "patch.fraction=0.6667", "train.steps=6", "train.warmup_steps=2"]  # 2 patch + 4 token steps
GATED_DROPPING = ["moe.shared_expert_gate=true", "moe.capacity_factor=0.75", "moe.jitter=0.05"]


def train_with_probes(dataset_dir, output_dir, overrides):
    """Train; every rank returns its full gradients (pipeline ranks hold different layers), the sequence
    lengths its blocks saw and its MoE layers' layouts; rank 0 adds the logged metrics."""
    import torch.distributed as dist

    from ppmoe.moe import MoEFeedForward
    from ppmoe.train import Trainer
    from ppmoe.train.metrics import read_metrics

    trainer = Trainer(tiny_config(dataset_dir, output_dir, overrides))
    block_seq = set()
    for part in trainer.current.runner.parts:
        for layer in part.layers.values():
            layer.register_forward_pre_hook(lambda module, args: block_seq.add(args[0].shape[1]))
    layouts = {type(m.layout).__name__ for m in trainer.model.modules() if isinstance(m, MoEFeedForward)}
    trainer.fit()
    report = {"grads": full_grads(trainer.model), "block_seq": block_seq, "layouts": layouts}
    if dist.get_rank() == 0:
        metrics = read_metrics(f"{output_dir}/metrics.jsonl")
        steps = sorted(s for s, m in metrics.items() if "loss" in m)
        report["metrics"] = {key: [metrics[s].get(key) for s in steps]
                             for key in ("loss", "grad_norm", "aux_loss", "z_loss", "phase")}
    return report


def run(world, dataset_dir, output_dir, overrides):
    """train_with_probes on `world` ranks: rank 0's report with the gradients of all ranks merged."""
    reports = run_ranks(train_with_probes, world, dataset_dir, str(output_dir), overrides)
    merged = dict(reports[0])
    merged["grads"] = {name: g for report in reports for name, g in report["grads"].items()}
    merged["block_seq"] = set().union(*(report["block_seq"] for report in reports))
    return merged


@pytest.fixture(scope="module")
def one_process(tiny_dataset, tmp_path_factory):
    """The single-process run of a model config (overrides without parallel.*), each run once."""
    cache = {}

    def get(overrides):
        key = tuple(o for o in overrides if not o.startswith("parallel."))
        if key not in cache:
            cache[key] = run(1, tiny_dataset, tmp_path_factory.mktemp("one_process"), list(key))
        return cache[key]

    return get


def assert_same_training(got, ref, what):
    """Logged losses and MoE aux/z losses to 1e-5 relative, gradient norms to 5e-5, every parameter's full
    gradient (after the last step) to GRAD_TOL times its largest entry."""
    m, r = got["metrics"], ref["metrics"]
    assert r["loss"][-1] < r["loss"][0], "the reference must learn, else matching it proves little"
    assert m["phase"] == r["phase"]
    torch.testing.assert_close(torch.tensor(m["loss"]), torch.tensor(r["loss"]), rtol=1e-5, atol=0)
    # Gradient norms to 5e-5: by the 6th step of the patch run rounding differences reach 1.5e-5 there.
    torch.testing.assert_close(torch.tensor(m["grad_norm"]), torch.tensor(r["grad_norm"]), rtol=5e-5, atol=0)
    if r["aux_loss"][0] is not None:
        assert m["aux_loss"] + m["z_loss"] == pytest.approx(r["aux_loss"] + r["z_loss"], rel=1e-5)
    assert sorted(got["grads"]) == sorted(ref["grads"])
    for name, g in ref["grads"].items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(got["grads"][name], g, rtol=0, atol=GRAD_TOL * g.abs().max().item(),
                                   msg=lambda msg: f"{what}: gradient of {name}: {msg}")


def assert_sequence_parallel(report, seq, tp, moe):
    """The run really was sequence parallel: blocks saw slices, MoE layers the SP layout."""
    assert report["block_seq"] == {seq // tp}, f"blocks saw {report['block_seq']} positions, not {seq} / {tp}"
    assert report["layouts"] == ({"SequenceParallelExpertsInTP"} if moe else set())


# TP sizes 2 and 4, dense and Pipeline-MoE: SP against plain TP at the same size and against one process.
AGAINST_TP = {
    "dense_tp2": (2, 2, ["parallel.tp=2"]),
    "dense_tp4": (4, 4, ["parallel.tp=4", *TP4]),
    "moe_tp2": (2, 2, [*MOE, "parallel.tp=2"]),
    "moe_tp4": (4, 4, [*MOE, "parallel.tp=4", *TP4]),
}


@pytest.mark.parametrize("case", sorted(AGAINST_TP))
def test_sequence_parallel_matches_tensor_parallel_and_one_process(case, one_process, tiny_dataset, tmp_path):
    world, tp, overrides = AGAINST_TP[case]
    moe = case.startswith("moe")
    reference = one_process(overrides)
    plain_tp = run(world, tiny_dataset, tmp_path / "tp", overrides)
    sequence = run(world, tiny_dataset, tmp_path / "sp", [*overrides, *SP])
    if moe:  # the routed experts, the shared expert and the router are all compared
        for part in ("experts.w1", "shared_expert.w2", "router.gate"):
            assert any(part in name for name in reference["grads"]), part
    assert_sequence_parallel(sequence, 16, tp, moe)
    assert plain_tp["block_seq"] == {16}
    assert_same_training(sequence, reference, f"{case} with SP against one process")
    assert_same_training(sequence, plain_tp, f"{case} with SP against TP without SP")


# SP composed with the rest: data parallelism (FSDP, DDP with gradient accumulation), pipeline stages
# (slices cross the stage boundary), patch input (the mean-pooling hook on sequence slices), a gated shared
# expert with capacity drops and router jitter (the gathered tokens are routed in the reference's order),
# a tied embedding (one vocabulary-sharded table for the reduce-scattered lookup and the gathered head).
AGAINST_ONE_PROCESS = {
    "dense_tp2_dp2_fsdp": (4, 2, 16, ["parallel.tp=2", "parallel.dp_type=fsdp"]),
    "dense_tp2_dp2_ddp_accum": (4, 2, 16, ["parallel.tp=2", "parallel.dp_type=ddp", "train.micro_batch_size=1"]),
    "moe_tp2_dp2_fsdp": (4, 2, 16, [*MOE, "parallel.tp=2"]),
    "dense_tp2_pp2_gpipe": (4, 2, 16, [*PP, "parallel.tp=2", "parallel.pp=2", "parallel.pp_schedule=gpipe"]),
    "moe_tp2_pp2_1f1b": (4, 2, 16, [*PP, *MOE, "parallel.tp=2", "parallel.pp=2"]),
    "moe_tp2_gated_dropping_jitter": (2, 2, 16, [*MOE, *GATED_DROPPING, "parallel.tp=2"]),
    "dense_tp2_tied_embeddings": (2, 2, 16, ["model.tie_embeddings=true", "parallel.tp=2"]),
    # seq_len 16 patches of K=4 tokens: the embedding's slices of 64 / 2 tokens are 8 whole patches each.
    "dense_tp2_patch": (2, 2, 16, [*PATCH, "parallel.tp=2"]),
}


@pytest.mark.parametrize("case", sorted(AGAINST_ONE_PROCESS))
def test_sequence_parallel_composes(case, one_process, tiny_dataset, tmp_path):
    world, tp, seq, overrides = AGAINST_ONE_PROCESS[case]
    reference = one_process(overrides)
    got = run(world, tiny_dataset, tmp_path, [*overrides, *SP])
    assert_sequence_parallel(got, seq, tp, "moe.num_experts=4" in overrides)
    if case.endswith("patch"):
        assert got["metrics"]["phase"] == ["patch"] * 2 + ["token"] * 4
    assert_same_training(got, reference, f"{case} with SP against one process")


def test_sequence_parallel_does_nothing_at_tp1(one_process, tiny_dataset, tmp_path):
    """At tp 1 the key changes nothing: bit for bit the plain run."""
    reference = one_process(MOE)
    got = run(1, tiny_dataset, tmp_path, [*MOE, *SP])
    assert got["metrics"] == reference["metrics"]
    assert got["block_seq"] == {16} and got["layouts"] == {"LocalExperts"}
    for name, g in reference["grads"].items():
        assert torch.equal(got["grads"][name], g), name


@pytest.mark.parametrize("overrides,world,message", [
    (["parallel.tp=4", "train.seq_len=18"], 4, "train.seq_len=18 is not divisible by parallel.tp=4"),
    (["parallel.tp=2", "moe.num_experts=2", "moe.dispatcher=local"], 2,
     "moe.dispatcher=local has no sequence-parallel form"),
    (["parallel.tp=2", "moe.num_experts=2", "moe.dispatcher=alltoall"], 2, "moe.dispatcher=alltoall runs at "
                                                                          "parallel.tp=1"),
])
def test_sequence_parallel_refusals(overrides, world, message):
    """Refused before anything is built: sequences that do not split evenly, MoE layouts without a
    sequence-parallel form (alltoall is a tp-1 layout, where SP does nothing)."""
    with pytest.raises(ConfigError, match=message):
        validate(load_config(None, [*overrides, *SP]), world)
    validate(load_config(None, [o for o in overrides if "seq_len" not in o and "dispatcher" not in o] + SP), world)


def test_sequence_parallel_starts_from_the_one_process_weights(tiny_dataset, tmp_path):
    """Built on the meta device with SP (norms replicated DTensors, the shared expert and its gate split
    by hand, a dense layer next to an MoE one), each rank's materialised shards are bit for bit the
    one-process model's weights of the same seed, under the same names."""
    overrides = [*MOE, "moe.shared_expert_gate=true", "moe.every=2"]
    single = run_ranks(fresh_full_params, 1, tiny_dataset, str(tmp_path / "one"), overrides)[0]
    sharded = run_ranks(fresh_full_params, 2, tiny_dataset, str(tmp_path / "sp"), [*overrides, "parallel.tp=2", *SP])[0]
    assert single.keys() == sharded.keys()
    assert any("shared_expert.gate" in name for name in single) and any("ffn_norm" in name for name in single)
    for name, value in single.items():
        assert torch.equal(value, sharded[name]), name


# ---- communication volume -------------------------------------------------------------------------------
class CollectiveVolume(TorchDispatchMode):
    """Adds up the collectives issued under it (DTensor's functional ones and ppmoe.moe.comm's c10d ones)
    in ring units: an all-reduce of N elements counts 2N, an all-gather to N or a reduce-scatter from N
    counts N (each moves (n - 1) / n of that per rank on a ring of n, the factor all share)."""

    # op -> (units per element, which argument is the whole tensor, its size in those arguments)
    UNITS = {"all_reduce": (2, 0, 1), "allreduce_": (2, 0, 1),
             "all_gather_into_tensor": (1, 0, "group"),  # the functional all-gather takes this rank's slice
             "_allgather_base_": (1, 0, 1),  # (output, input)
             "reduce_scatter_tensor": (1, 0, 1), "_reduce_scatter_base_": (1, 1, 1)}  # (output, input)

    def __init__(self, group_size):
        super().__init__()
        self.group_size, self.total = group_size, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in self.UNITS:
            units, index, times = self.UNITS[name]
            tensor = args[index][0] if isinstance(args[index], list) else args[index]
            self.total += units * tensor.numel() * (self.group_size if times == "group" else times)
        return func(*args, **(kwargs or {}))


def block_volumes():
    """Ring units of one block's forward + backward at tp 2, dense and MoE, without and with SP."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from ppmoe.model.build import build_model
    from ppmoe.model.gpt import GPTShape
    from ppmoe.moe import MoEShape, build_expert_layout
    from ppmoe.parallel import apply_expert_layout
    from ppmoe.parallel.sequence_parallel import sum_partial_gradients, tensor_parallel_step

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (1, 1, 2), mesh_dim_names=("pp", "dp", "tp"))
    volumes = {}
    for kind, moe in (("dense", None), ("moe", MoEShape(num_experts=4, top_k=2, expert_hidden=64,
                                                       shared_expert_hidden=32))):
        for sp in (False, True):
            shape = GPTShape(n_layers=1, d_model=32, n_heads=4, n_kv_heads=2, ffn_hidden=64, vocab_size=128,
                             max_seq_len=16, moe=moe)
            model = build_model(shape, 0, "cpu", build_expert_layout("experts_in_tp", mesh, 4 if moe else 0))
            tensor_parallel_step(sp)(model, mesh["tp"])
            apply_expert_layout(model)
            sum_partial_gradients(model)
            x = torch.randn(2, 8 if sp else 16, 32, requires_grad=True)  # SP: this rank's half of the sequence
            with CollectiveVolume(2) as counter:
                model.layers["0"](x, model.rope_cos, model.rope_sin).sum().backward()
            volumes[kind, sp] = counter.total
    return volumes


def test_communication_volume_per_block():
    """Per block, SP moves what TP's all-reduces move: attention and the dense FFN each swap one
    all-reduce of T x d per pass for an all-gather + a reduce-scatter (2 x 2 x 2 = 8 T d units either
    way), plus the norm weights' gradient sums (2 norms x 2 d). The Pipeline-MoE layer under SP moves what
    the dense FFN does plus the all-reduce of the T x k gate-weight gradients: its shared expert rides on
    its gather/scatter, where TP's shared expert adds an all-reduce per pass (3 with one per
    column-parallel layer in backward: 6 T d units). T = 2 x 16 tokens, d = 32, k = 2."""
    t, d, k = 32, 32, 2
    volumes = run_ranks(block_volumes, 2)[0]
    assert volumes["dense", False] == 8 * t * d
    assert volumes["dense", True] == volumes["dense", False] + 2 * 2 * d
    assert volumes["moe", True] == volumes["dense", False] + 2 * t * k + 2 * 2 * d
    assert volumes["moe", False] == volumes["dense", False] + 6 * t * d + 2 * t * k


# ---- checkpoints --------------------------------------------------------------------------------------
def test_checkpoints_cross_sequence_parallel(tiny_dataset, tmp_path):
    """A checkpoint saved with SP (the norm weights replicated DTensors, the shared expert split by
    hand) holds the same keys as one saved by one process, resumes at one process, and one saved by one
    process resumes with SP: both continue the uninterrupted run's loss curve (to 1e-5 relative)."""
    from torch.distributed.checkpoint import FileSystemReader

    from test_resume import STEPS as RESUME_STEPS, losses, run_killed, train

    moe_sp = [*MOE, "parallel.tp=2", *SP]
    run_ranks(train, 1, tiny_dataset, str(tmp_path / "straight"), MOE)
    expected = losses(tmp_path / "straight")
    for name, saved_by, resumed_by in (("sp_then_one", (2, moe_sp), (1, MOE)), ("one_then_sp", (1, MOE), (2, moe_sp))):
        out = str(tmp_path / name)
        codes = run_killed(saved_by[0], tiny_dataset, out, [*saved_by[1], "checkpoint.every=3"], 5)
        assert codes == [-signal.SIGKILL] * saved_by[0]
        run_ranks(train, resumed_by[0], tiny_dataset, out, [*resumed_by[1], "checkpoint.every=3"])
        resumed = losses(out)
        assert sorted(resumed) == list(range(1, RESUME_STEPS + 1))
        for step in range(4, RESUME_STEPS + 1):
            assert resumed[step] == pytest.approx(expected[step], rel=1e-5, abs=0), (name, step)
    keys = {name: set(FileSystemReader(str(tmp_path / name / "checkpoints" / "step_00000003")).read_metadata()
                      .state_dict_metadata) for name in ("sp_then_one", "one_then_sp")}
    assert keys["sp_then_one"] == keys["one_then_sp"]
    assert any("shared_expert.w2" in key for key in keys["sp_then_one"])
