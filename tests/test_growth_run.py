"""Growth inside a running job: the boundary (checkpoint -> transform -> rebuild -> load) in every layout
against one process, runs killed before, during and after the growth against the uninterrupted run,
the grown checkpoint independent of how many ranks wrote it, and the recipe of the demo (a patch stage,
then a dense model upcycled into Pipeline-MoE at TP=2)."""

import os
import signal
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from multiproc import run_ranks, run_ranks_expecting_death
from ppmoe.growth.transform import GROWN_DIR, GROWTH_MANIFEST
from ppmoe.train.checkpoint import complete_checkpoints
from ppmoe.train.metrics import read_metrics
from test_parallel_equivalence import GRAD_TOL, full_grads, tiny_config
from test_resume import die_before_step

STEPS = 8  # split by steps: 4 small + 4 full, growth at step 4
FINAL = ["model.n_layers=4", "model.d_model=64", "model.n_heads=8", "model.n_kv_heads=4", "model.ffn_hidden=128"]
GROWTH = [*FINAL, f"train.steps={STEPS}", "growth.split=steps", "growth.rewarm_steps=2",
          "growth.stages.0.name=small", "growth.stages.0.share=0.5",
          "growth.stages.0.model={n_layers: 2, d_model: 32, n_heads: 4, n_kv_heads: 2, ffn_hidden: 64}",
          "growth.stages.1.name=full", "growth.stages.1.share=0.5"]
BOUNDARY = 4
GROWN_GRAD_TOL = 4 * GRAD_TOL  # after a growth with a fresh optimizer; see test_growth_in_any_layout_matches_one_process


def train(dataset_dir, output_dir, overrides, kill=None):
    """Train; `kill`: ('before_step', N) SIGKILLs just before step N, ('publish', None) just before the grown
    checkpoint is renamed into place (the transform written, not yet published). Returns full gradients."""
    from ppmoe.growth import transform
    from ppmoe.train import Trainer

    trainer = Trainer(tiny_config(dataset_dir, output_dir, overrides))
    if kill and kill[0] == "before_step":
        die_before_step(trainer, kill[1])
    if kill and kill[0] == "publish":
        transform.publish = lambda tmp, target: os.kill(os.getpid(), signal.SIGKILL)
    trainer.fit()
    return full_grads(trainer.model)


def run_killed(world, *args):
    """`train` on `world` forked ranks that SIGKILL themselves; their exit codes."""
    return run_ranks_expecting_death(train, world, *args)


def records(run_dir):
    return read_metrics(Path(run_dir) / "metrics.jsonl")


def curve(run_dir):
    return {s: m["loss"] for s, m in records(run_dir).items() if "loss" in m}


def merged(per_rank):
    out = {}
    for grads in per_rank:
        out.update(grads)
    return out


@pytest.fixture(scope="module")
def reference(tiny_dataset, tmp_path_factory):
    """One process, identity depth (exact), so the growth probe must not move."""
    out = tmp_path_factory.mktemp("growth_reference")
    grads = run_ranks(train, 1, tiny_dataset, str(out),
                      [*GROWTH, "growth.ops.depth=identity", "checkpoint.every=2"])[0]
    return out, grads


def test_growth_run_logs_stages_probe_params_and_flops(reference):
    from ppmoe.model import count_parameters
    from ppmoe.train.plan import build_stage_plan

    out, _ = reference
    metrics = records(out)
    assert [metrics[s]["stage"] for s in range(1, STEPS + 1)] == ["small"] * 4 + ["full"] * 4
    growth = metrics[BOUNDARY]
    assert growth["event"] == "growth" and growth["from_stage"] == "small" and growth["exact"] is True
    # identity depth, cloned width and tiled FFN preserve the function: the probe loss stays (fp32 rounding)
    assert growth["probe_loss_after"] == pytest.approx(growth["probe_loss_before"], rel=1e-5)
    plan = build_stage_plan(tiny_config(str(out), str(out), GROWTH), 300)
    small, full = plan.stages
    assert (growth["params_before"], growth["params_after"]) == (count_parameters(small.shape), count_parameters(full.shape))
    flops = [metrics[s]["flops"] for s in range(1, STEPS + 1)]
    assert flops[1] - flops[0] == pytest.approx(small.flops_per_step)  # each stage counted at its own shape
    assert flops[5] - flops[4] == pytest.approx(full.flops_per_step) and full.flops_per_step > 3 * small.flops_per_step
    assert metrics[STEPS]["loss"] < metrics[1]["loss"]
    grown = out / "checkpoints" / f"step_{BOUNDARY:08d}" / GROWN_DIR
    assert (grown / ".metadata").is_file() and (grown / GROWTH_MANIFEST).is_file()


LAYOUTS = {
    "tp2": (2, ["parallel.tp=2"]),
    "pp2": (2, ["parallel.pp=2"]),
    "dp2": (2, ["parallel.dp_type=fsdp"]),
    # the layout changes at the boundary: the small model data-parallel, the grown one tp2 x pp2
    "dp4_to_tp2_pp2": (4, ["parallel.tp=2", "parallel.pp=2", "growth.stages.0.parallel={tp: 1, pp: 1}"]),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_growth_in_any_layout_matches_one_process(layout, reference, tiny_dataset, tmp_path):
    out, grads = reference
    world, overrides = LAYOUTS[layout]
    got = merged(run_ranks(train, world, tiny_dataset, str(tmp_path),
                           [*GROWTH, "growth.ops.depth=identity", *overrides]))
    expected, parallel = curve(out), curve(tmp_path)
    for step in range(1, STEPS + 1):
        assert parallel[step] == pytest.approx(expected[step], rel=1e-5), (layout, step)
    assert records(tmp_path)[BOUNDARY]["event"] == "growth"
    # the grown checkpoint this layout wrote holds the one-process run's grown tensors, up to what 4 Adam
    # steps of the small model made of fp32 rounding (a few elements, at ~2e-4 of the tensor's largest entry)
    grown = f"checkpoints/step_{BOUNDARY:08d}/{GROWN_DIR}"
    here, there = read_checkpoint(tmp_path / grown), read_checkpoint(out / grown)
    assert here.keys() == there.keys() and any(k.startswith("model.layers.3.") for k in here)
    for key, expected in there.items():
        torch.testing.assert_close(here[key], expected, rtol=0, atol=GRAD_TOL * expected.abs().max().item(),
                                   msg=lambda m: f"{layout} grown {key}: {m}")
    assert got.keys() == grads.keys()
    for name, g in grads.items():
        # The grown stage's fresh AdamW takes its first step at full learning rate, and Adam's first update is
        # ~lr * sign(gradient) even for noise-level gradients (~1e-9, e.g. behind identity layers' zeroed
        # projections), whose sign is summation order: gradients agree to 2e-3 of their largest entry, losses
        # to 1e-5.
        torch.testing.assert_close(got[name], g, rtol=0, atol=GROWN_GRAD_TOL * g.abs().max().item(),
                                   msg=lambda m: f"{layout} gradient of {name}: {m}")


def read_checkpoint(path):
    """Every tensor of a DCP checkpoint, read by one process."""
    meta = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    out = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in meta.items() if hasattr(v, "size")}
    dcp.load(out, checkpoint_id=str(path), no_dist=True)
    return out


def grow_at(checkpoint, moments):
    """grow_checkpoint on this process's rank of the world (small -> full of GROWTH)."""
    import torch.distributed as dist

    from ppmoe.growth import GrowthSpec, grow_checkpoint
    from ppmoe.train.plan import build_stage_plan

    dist.init_process_group("gloo")
    cfg = tiny_config("unused", "unused", GROWTH)
    small, full = build_stage_plan(cfg, 300).stages
    spec = GrowthSpec(small.shape, full.shape, cfg.growth.ops, cfg.train.seed, full.name, moments)
    world = dist.get_world_size()
    return str(grow_checkpoint(Path(checkpoint), spec, dist.get_rank(), world, no_dist=world == 1).path)


def test_grown_checkpoint_does_not_depend_on_the_number_of_ranks(reference, tmp_path):
    """The boundary checkpoint grown by 1 process and by 4 (keys partitioned): identical tensors, Adam
    moments included; the step count is kept."""
    import shutil

    out, _ = reference
    boundary = out / "checkpoints" / f"step_{BOUNDARY:08d}"
    grown = {}
    for world in (1, 4):
        copy = tmp_path / f"world{world}"
        shutil.copytree(boundary, copy, ignore=shutil.ignore_patterns(GROWN_DIR))
        grown[world] = read_checkpoint(run_ranks(grow_at, world, str(copy), True)[0])
    assert grown[1].keys() == grown[4].keys()
    assert any(k.endswith(".exp_avg_sq") for k in grown[1]) and "model.layers.3.attention.wq.weight" in grown[1]
    for key in grown[1]:
        assert torch.equal(grown[1][key], grown[4][key]), key
    source = read_checkpoint(boundary)
    assert torch.equal(grown[1]["optim.state.layers.3.attention.wq.weight.step"],
                       source["optim.state.layers.1.attention.wq.weight.step"])


@pytest.fixture(scope="module")
def straight(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("growth_straight")
    run_ranks(train, 1, tiny_dataset, str(out), [*GROWTH, "checkpoint.every=2"])
    return curve(out)


KILLS = {"before_the_boundary": ("before_step", BOUNDARY), "mid_transform": ("publish", None),
         "after_the_growth": ("before_step", BOUNDARY + 2)}


@pytest.mark.parametrize("when", sorted(KILLS))
def test_killed_around_the_boundary_resumes_onto_the_same_curve(when, straight, tiny_dataset, tmp_path):
    common = [*GROWTH, "checkpoint.every=2"]
    assert run_killed(1, tiny_dataset, str(tmp_path), common, KILLS[when]) == [-signal.SIGKILL]
    saved = [p.name for p in complete_checkpoints(tmp_path / "checkpoints")]
    boundary = tmp_path / "checkpoints" / f"step_{BOUNDARY:08d}"
    if when == "mid_transform":
        assert (boundary.parent / f"{boundary.name}" / f"{GROWN_DIR}.tmp").is_dir()  # written, never published
        assert not (boundary / GROWN_DIR).exists()
    assert saved[-1] == ("step_00000002" if when == "before_the_boundary" else boundary.name)
    run_ranks(train, 1, tiny_dataset, str(tmp_path), common)
    resumed = curve(tmp_path)
    for step in range(1, STEPS + 1):
        assert resumed[step] == straight[step], (when, step)  # one process: bit for bit
    assert (boundary / GROWN_DIR / ".metadata").is_file()


def test_killed_mid_transform_at_tp2_resumes(straight, tiny_dataset, tmp_path):
    common = [*GROWTH, "checkpoint.every=2", "parallel.tp=2"]
    assert run_killed(2, tiny_dataset, str(tmp_path), common, ("publish", None))[0] == -signal.SIGKILL
    run_ranks(train, 2, tiny_dataset, str(tmp_path), common)
    resumed = curve(tmp_path)
    for step in range(1, STEPS + 1):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-5), step


def test_transform_policy_carries_the_optimizer_over(tiny_dataset, tmp_path):
    """growth.optimizer=transform: the grown model starts with Adam moments and the step count kept."""
    def steps_after_growth(dataset_dir, output_dir):
        from ppmoe.train import Trainer

        trainer = Trainer(tiny_config(dataset_dir, output_dir, [*GROWTH, "growth.optimizer=transform",
                                                                f"train.steps={STEPS}"]))
        trainer.fit()
        steps = {float(s["step"]) for s in trainer.optimizer.state.values()}
        nonzero = all(float(s["exp_avg_sq"].abs().sum()) > 0 for s in trainer.optimizer.state.values())
        return steps, nonzero

    steps, nonzero = run_ranks(steps_after_growth, 1, tiny_dataset, str(tmp_path))[0]
    assert steps == {float(STEPS)} and nonzero  # counted from step 1: the boundary did not reset Adam


# The demo's recipe: a patch stage (K=4) of a small dense model, its token stage, then growth into the final
# model with Pipeline-MoE layers (every other layer, upcycled from the dense FFN) at TP=2.
RECIPE = [*FINAL, "train.steps=9", "growth.split=steps", "moe.num_experts=4", "moe.every=2",
          "moe.expert_hidden=128", "growth.ops.depth=stack",
          "growth.stages.0.name=patch", "growth.stages.0.share=0.3333", "growth.stages.0.patch_size=4",
          "growth.stages.0.model={n_layers: 2, d_model: 32, n_heads: 4, n_kv_heads: 2, ffn_hidden: 64}",
          "growth.stages.0.moe={num_experts: 0}",
          "growth.stages.1.name=small", "growth.stages.1.share=0.3333",
          "growth.stages.1.model={n_layers: 2, d_model: 32, n_heads: 4, n_kv_heads: 2, ffn_hidden: 64}",
          "growth.stages.1.moe={num_experts: 0}",
          "growth.stages.2.name=moe", "growth.stages.2.share=0.3334"]


def test_patch_stage_then_upcycling_into_pipeline_moe_at_tp2_matches_one_process(tiny_dataset, tmp_path):
    single, tp2 = tmp_path / "single", tmp_path / "tp2"
    grads = run_ranks(train, 1, tiny_dataset, str(single), RECIPE)[0]
    got = merged(run_ranks(train, 2, tiny_dataset, str(tp2), [*RECIPE, "parallel.tp=2"]))
    metrics = records(single)
    assert [metrics[s]["phase"] for s in range(1, 10)] == ["patch"] * 3 + ["token"] * 6
    assert metrics[3]["event"] == "stage" and metrics[6]["event"] == "growth"  # K 4 -> 1, then the growth
    assert "expert_load" in metrics[9] and "expert_load" not in metrics[5]
    expected, parallel = curve(single), curve(tp2)
    for step in range(1, 10):
        assert parallel[step] == pytest.approx(expected[step], rel=1e-5), step
    assert any("experts" in k for k in grads)
    for name, g in grads.items():
        # (as above; and the attention q/k gradients of layer 0 are sums that cancel to ~1e-6)
        torch.testing.assert_close(got[name], g, rtol=0, atol=GROWN_GRAD_TOL * g.abs().max().item(), msg=lambda m: f"gradient of {name}: {m}")
