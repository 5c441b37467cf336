"""The zero-bubble pipeline schedules and tied embeddings under pipeline parallelism, against the
single-process reference (tests/test_parallel_equivalence.py's tiny GPT, data and tolerances).

Zero bubble (interleaved_zb, zbv, dualpipev) splits each backward into input gradients (B) and weight
gradients (W) run later; the sums are those of one process in another order, so losses and grad norms
match to 1e-5 relative, every gradient element to GRAD_TOL times its tensor's largest entry and the final
weights to WEIGHT_TOL (fp32).
A tied embedding keeps one copy on the first stage and one on the last: same losses, gradients and weights
as the single-process tied model; the two copies stay equal bit for bit, start bit for bit from the
one-process weight, and checkpoints load between pp1 and pp2 bit for bit.
"""

import pytest
import torch
from torch.distributed.pipelining.schedules import generate_rank_to_stage_mapping

from multiproc import run_ranks
from ppmoe.config import load_config
from ppmoe.parallel.pipeline import SCHEDULES, stage_ids
from test_parallel_equivalence import GRAD_TOL, MOE, STEPS, full_grads, tiny_config

PP_BASE = ["model.n_layers=4"]
# Final weights after STEPS AdamW steps (lr 1e-2, 5e-3, 3e-5): one step moves an element by up to lr, so a
# wrong gradient shows ~100x above this; the gradients' fp32 rounding (another reduction order under TP)
# moves a few elements whose gradient is near AdamW's eps by ~1.4e-5.
WEIGHT_TOL = 5e-5
ZB_LAYOUTS = {
    "interleaved_zb": (2, ["parallel.pp=2", "parallel.pp_schedule=interleaved_zb", "parallel.pp_virtual_stages=2"]),
    "zbv": (2, ["parallel.pp=2", "parallel.pp_schedule=zbv", "parallel.pp_virtual_stages=2"]),
    "dualpipev": (2, ["parallel.pp=2", "parallel.pp_schedule=dualpipev", "parallel.pp_virtual_stages=2"]),
}


def count_weight_backwards(monkeypatch_target) -> list[int]:
    """Count the W (weight-gradient) halves of split backwards that torch's stages run in this process."""
    calls = [0]
    original = monkeypatch_target.stage_backward_weight

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch_target.stage_backward_weight = counting
    return calls


def stage_end_weights(trainer) -> dict:
    """The embedding and head weights this rank's stage modules hold themselves (not the view's names),
    full tensors. A head that follows the embedding on the same rank is refreshed before each step: it
    is read as the next step would see it."""
    from torch.distributed.tensor import DTensor

    runner = trainer.current.runner
    if hasattr(runner, "tie"):
        runner.tie.before_step()
    ends = {}
    for part in runner.parts:
        for key, module in (("embedding", part.tok_embeddings), ("head", part.output)):
            if module is not None:
                w = module.weight
                ends[key] = (w.full_tensor() if isinstance(w, DTensor) else w).detach().clone()
    return ends


def train_all_ranks(dataset_dir, output_dir, overrides):
    """Rank 0's logged losses and grad norms; every rank's full gradients and parameters (by name) and
    how many split-backward W steps it ran."""
    import torch.distributed as dist
    import torch.distributed.pipelining.stage as torch_stage

    from ppmoe.train import Trainer
    from ppmoe.train.metrics import read_metrics
    from torch.distributed.tensor import DTensor

    weight_backwards = count_weight_backwards(torch_stage)  # (a forked rank: the patch dies with it)
    trainer = Trainer(tiny_config(dataset_dir, output_dir, overrides))
    trainer.fit()
    params = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
              for n, p in trainer.model.state_dict(keep_vars=True).items()}
    report = {"grads": full_grads(trainer.model), "params": params, "weight_backwards": weight_backwards[0],
              "ends": stage_end_weights(trainer)}
    if dist.get_rank() == 0:
        metrics = read_metrics(f"{output_dir}/metrics.jsonl")
        report.update(losses=[metrics[s]["loss"] for s in range(1, STEPS + 1)],
                      grad_norms=[metrics[s]["grad_norm"] for s in range(1, STEPS + 1)],
                      moe=[metrics[s].get("aux_loss") for s in range(1, STEPS + 1)])
    return report


def merged(reports, key):
    out = {}
    for report in reports:
        out.update(report[key])
    return out


def assert_matches(reports, ref, what):
    """Losses, grad norms and every gradient of the pipelined run (`reports`, one per rank) as the
    single-process run's."""
    got, grads = reports[0], merged(reports, "grads")
    assert ref["losses"][-1] < ref["losses"][0]  # the reference learns, so matching it means something
    assert sorted(grads) == sorted(ref["grads"])
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(got["grad_norms"]), torch.tensor(ref["grad_norms"]), rtol=1e-5, atol=0)
    for name, g in ref["grads"].items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(grads[name], g, rtol=0, atol=GRAD_TOL * g.abs().max().item(),
                                   msg=lambda m: f"{what}: gradient of {name}: {m}")
    if ref["moe"][0] is not None:
        assert got["moe"] == pytest.approx(ref["moe"], rel=1e-5)
    params = merged(reports, "params")  # after the last optimizer step
    assert sorted(params) == sorted(ref["params"])
    for name, w in ref["params"].items():
        torch.testing.assert_close(params[name], w, rtol=0, atol=WEIGHT_TOL,
                                   msg=lambda m: f"{what}: final {name}: {m}")


@pytest.fixture(scope="module")
def references(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("schedule_refs")
    runs = {"dense": PP_BASE, "moe": [*PP_BASE, *MOE], "tied": [*PP_BASE, "model.tie_embeddings=true"],
            "tied_moe": [*PP_BASE, *MOE, "model.tie_embeddings=true"]}
    return {name: run_ranks(train_all_ranks, 1, tiny_dataset, str(out / name), overrides)[0]
            for name, overrides in runs.items()}


# ---- placement -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["zbv", "dualpipev"])
@pytest.mark.parametrize("pp", [2, 4])
def test_v_schedules_get_the_v_placement_torch_expects(schedule, pp):
    """Rank r runs stages r and 2 pp - 1 - r, as torch's V schedules map them (not the looped r, r + pp)."""
    par = load_config(None, [f"parallel.pp={pp}", f"parallel.pp_schedule={schedule}",
                             "parallel.pp_virtual_stages=2"]).parallel
    expected = generate_rank_to_stage_mapping(pp, 2 * pp, style="v")
    assert {r: stage_ids(r, par) for r in range(pp)} == expected
    assert stage_ids(0, par) == [0, 2 * pp - 1]


def test_every_schedule_value_has_a_schedule():
    from typing import get_args, get_type_hints

    from ppmoe.config import ParallelConfig

    assert set(get_args(get_type_hints(ParallelConfig)["pp_schedule"])) == set(SCHEDULES)


# ---- zero-bubble schedules -------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["dense", "moe"])
@pytest.mark.parametrize("schedule", sorted(ZB_LAYOUTS))
def test_zero_bubble_schedule_matches_single_process(schedule, model, references, tiny_dataset, tmp_path):
    """B/W-split backward through attention, SwiGLU, the router and experts (top-2, shared expert, aux
    losses attached to the activations): losses, grad norms, gradients and aux losses as one process."""
    world, overrides = ZB_LAYOUTS[schedule]
    extra = MOE if model == "moe" else []
    reports = run_ranks(train_all_ranks, world, tiny_dataset, str(tmp_path), [*PP_BASE, *extra, *overrides])
    assert sum(r["weight_backwards"] for r in reports) > 0  # the backward was split, not run whole
    assert_matches(reports, references[model], f"{schedule} {model}")


# ---- tied embeddings -------------------------------------------------------------------------------------
TIED = [*PP_BASE, "model.tie_embeddings=true"]
TIED_LAYOUTS = {
    "1f1b": (2, ["parallel.pp=2"]),
    "interleaved_1f1b": (2, ["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_virtual_stages=2"]),
    # the V puts both ends on rank 0: the head's copy follows the embedding
    "zbv": (2, ["parallel.pp=2", "parallel.pp_schedule=zbv", "parallel.pp_virtual_stages=2"]),
    "dualpipev": (2, ["parallel.pp=2", "parallel.pp_schedule=dualpipev", "parallel.pp_virtual_stages=2",
                      "train.micro_batch_size=1"]),
}


def end_weights(reports):
    """(the embedding's copy, the head's copy) from the ranks holding them."""
    embedding = next(r["ends"]["embedding"] for r in reports if "embedding" in r["ends"])
    head = next(r["ends"]["head"] for r in reports if "head" in r["ends"])
    return embedding, head


@pytest.mark.parametrize("layout", sorted(TIED_LAYOUTS))
def test_tied_embedding_under_pp_matches_single_process(layout, references, tiny_dataset, tmp_path):
    """The first stage's embedding and the last stage's head: their gradients summed after each backward,
    the single-process tied model's losses, grad norm (the tied weight counted once) and gradient; after
    the steps, both copies equal each other bit for bit and the reference's weight to fp32 rounding."""
    world, overrides = TIED_LAYOUTS[layout]
    ref = references["tied"]
    reports = run_ranks(train_all_ranks, world, tiny_dataset, str(tmp_path), [*TIED, *overrides])
    assert "output.weight" not in ref["grads"]  # one parameter in the reference
    assert_matches(reports, ref, f"tied {layout}")
    embedding, head = end_weights(reports)
    assert torch.equal(embedding, head)
    # fp32 rounding: dualpipev runs 1-sequence micro-batches (it needs 2 pp of them), whose gradients sum in
    # another order than the reference's (measured: 1.8e-6 at most)
    torch.testing.assert_close(embedding, ref["params"]["tok_embeddings.weight"], rtol=1e-5, atol=1e-5)
    holders = [r["grads"]["tok_embeddings.weight"] for r in reports if "tok_embeddings.weight" in r["grads"]]
    assert all(torch.equal(g, holders[0]) for g in holders)  # each end holds the whole tied gradient


# ---- with tensor and data parallelism inside the stages (world 4) ------------------------------------------
COMPOSED = {
    # FSDP2 inside each stage: the schedule defers the reduce-scatter to the end of the step (W included),
    # and the blocks stay gathered from forward to W (else W differentiates against the sharded weights)
    "interleaved_zb_dp2_fsdp": ("dense", ["parallel.pp=2", "parallel.pp_schedule=interleaved_zb",
                                          "parallel.pp_virtual_stages=2"]),
    "zbv_dp2_fsdp_moe": ("moe", ["parallel.pp=2", "parallel.pp_schedule=zbv", "parallel.pp_virtual_stages=2"]),
    # Pipeline-MoE's all-reduces and the TP collectives inside B and W
    "interleaved_zb_tp2_moe": ("moe", ["parallel.pp=2", "parallel.tp=2", "parallel.pp_schedule=interleaved_zb",
                                       "parallel.pp_virtual_stages=2"]),
    "dualpipev_dp2_ddp": ("dense", ["parallel.pp=2", "parallel.pp_schedule=dualpipev", "parallel.pp_virtual_stages=2",
                                    "parallel.dp_type=ddp", "train.micro_batch_size=1"]),
    "tied_1f1b_dp2_fsdp": ("tied", ["parallel.pp=2"]),
    "tied_1f1b_tp2": ("tied", ["parallel.pp=2", "parallel.tp=2"]),
    # both ends on rank 0, FSDP-sharded alike: the head's shard copies the embedding's
    "tied_zbv_dp2_fsdp": ("tied", ["parallel.pp=2", "parallel.pp_schedule=zbv", "parallel.pp_virtual_stages=2"]),
    "tied_zbv_tp2": ("tied", ["parallel.pp=2", "parallel.tp=2", "parallel.pp_schedule=zbv",
                              "parallel.pp_virtual_stages=2"]),
    # tie, Pipeline-MoE and sequence parallelism together (the head all-gathers the sequence slices)
    "tied_moe_1f1b_tp2_sp": ("tied_moe", ["parallel.pp=2", "parallel.tp=2", "parallel.sequence_parallel=true"]),
    "tied_moe_zbv_tp2": ("tied_moe", ["parallel.pp=2", "parallel.tp=2", "parallel.pp_schedule=zbv",
                                      "parallel.pp_virtual_stages=2"]),
}
MODEL_OVERRIDES = {"dense": PP_BASE, "moe": [*PP_BASE, *MOE], "tied": TIED,
                   "tied_moe": [*TIED, *MOE]}


@pytest.mark.parametrize("layout", sorted(COMPOSED))
def test_composed_layout_matches_single_process(layout, references, tiny_dataset, tmp_path):
    model, overrides = COMPOSED[layout]
    reports = run_ranks(train_all_ranks, 4, tiny_dataset, str(tmp_path), [*MODEL_OVERRIDES[model], *overrides])
    assert_matches(reports, references[model], layout)
    if model.startswith("tied"):
        embedding, head = end_weights(reports)
        assert torch.equal(embedding, head)


# ---- tied embeddings: start values and checkpoints ---------------------------------------------------------
def built_ends_and_params(dataset_dir, output_dir, overrides):
    """Build a trainer (loading the newest checkpoint in output_dir, if any): every rank's copies of the
    tied weight and its parameters by name, gathered to rank 0, and the step it resumed at."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from ppmoe.train import Trainer

    trainer = Trainer(tiny_config(dataset_dir, output_dir, overrides))
    trainer.maybe_resume()
    params = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
              for n, p in trainer.model.named_parameters()}
    mine = {"params": params, "ends": stage_end_weights(trainer) if hasattr(trainer.current.runner, "tie") else
            {"embedding": params["tok_embeddings.weight"], "head": trainer.model.output.weight.detach().clone()}}
    gathered = [mine]
    if dist.get_world_size() > 1:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
    return {"params": merged(gathered, "params"), "copies": [c for g in gathered for c in g["ends"].values()],
            "step": trainer.step}


TIED_PP = {"1f1b": (2, ["parallel.pp=2"]), "zbv": TIED_LAYOUTS["zbv"]}


@pytest.mark.parametrize("layout", sorted(TIED_PP))
def test_tied_pipeline_starts_from_the_one_process_tied_weights(layout, tiny_dataset, tmp_path):
    """The head's copy is initialised under its own name (output.weight) on the meta build; the broadcast
    from the embedding's rank (1f1b) or the copy on the same rank (zbv) makes it the embedding, bit for bit
    the one-process tied model's weight."""
    world, overrides = TIED_PP[layout]
    single = run_ranks(built_ends_and_params, 1, tiny_dataset, str(tmp_path / "one"), TIED)[0]
    piped = run_ranks(built_ends_and_params, world, tiny_dataset, str(tmp_path / "pp"), [*TIED, *overrides])[0]
    assert single["params"].keys() == piped["params"].keys()
    for name, value in single["params"].items():
        assert torch.equal(value, piped["params"][name]), name
    assert len(piped["copies"]) == 2  # the embedding and the head, wherever they live
    for copy in piped["copies"]:
        assert torch.equal(copy, single["params"]["tok_embeddings.weight"])


def checkpoint_keys(run_dir) -> set:
    import torch.distributed.checkpoint as dcp

    from ppmoe.train.checkpoint import CheckpointManager

    latest = CheckpointManager(run_dir / "checkpoints", keep=3, rank=0).latest()
    return set(dcp.FileSystemReader(str(latest)).read_metadata().state_dict_metadata)


@pytest.mark.parametrize("layout", sorted(TIED_PP))
def test_tied_checkpoints_load_across_pipeline_layouts(layout, tiny_dataset, tmp_path):
    """A tied pp2 run saves the one-process tied model's keys (model and optimizer); its checkpoint loads
    into one process and a one-process checkpoint loads into pp2, both copies of the tied weight taking
    the saved value."""
    import shutil

    world, overrides = TIED_PP[layout]
    save = [*TIED, "checkpoint.save_final=true"]
    run_ranks(train_all_ranks, 1, tiny_dataset, str(tmp_path / "one"), save)
    run_ranks(train_all_ranks, world, tiny_dataset, str(tmp_path / "pp"), [*save, *overrides])
    assert checkpoint_keys(tmp_path / "one") == checkpoint_keys(tmp_path / "pp")

    for source, world_to, to_overrides in [("pp", 1, []), ("one", world, overrides)]:
        saved = run_ranks(built_ends_and_params, world if source == "pp" else 1, tiny_dataset,
                          str(tmp_path / source), [*TIED, *(overrides if source == "pp" else [])])[0]
        assert saved["step"] == STEPS
        target = tmp_path / f"{source}_loaded"
        shutil.copytree(tmp_path / source / "checkpoints", target / "checkpoints")
        loaded = run_ranks(built_ends_and_params, world_to, tiny_dataset, str(target), [*TIED, *to_overrides])[0]
        assert loaded["step"] == STEPS
        assert loaded["params"].keys() == saved["params"].keys()
        for name, value in saved["params"].items():
            assert torch.equal(loaded["params"][name], value), (source, name)
        for copy in loaded["copies"]:
            assert torch.equal(copy, saved["params"]["tok_embeddings.weight"]), source
