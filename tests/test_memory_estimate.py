"""The start-up memory estimate (ppmoe/train/memory_estimate.py) and the CUDA allocator's settings.

The parameter and optimizer parts are exact: compared with the bytes the built model and AdamW hold on
every rank of real gloo runs (one process, TP=2 with Pipeline-MoE, FSDP DP=2 with all-to-all experts
and an uneven FSDP split, PP=2). The activation part is a model (the module docstring): its tests check
that it moves the way the formulas say.
"""

from __future__ import annotations

import os

import pytest

from multiproc import run_ranks
from ppmoe.config import load_config, resolve_layout
from ppmoe.model import model_shape
from ppmoe.parallel.distributed import EXPANDABLE_SEGMENTS, allocator_settings
from ppmoe.train.memory_estimate import (activation_bytes, chunk_size, estimate_memory, layer_activations,
                                         memory_report, micro_batches_in_flight)
from ppmoe.train.plan import build_stage_plan
from test_parallel_equivalence import tiny_config

# MoE every layer, 4 experts, top-2, a gated shared expert (its [1, d_model] gate splits unevenly over dp=2)
MOE = ["moe.num_experts=4", "moe.top_k=2", "moe.shared_expert_hidden=32", "moe.shared_expert_gate=true"]
LAYOUTS = {
    "one_process": (1, MOE),
    "tp2_experts_in_tp": (2, [*MOE, "parallel.tp=2", "moe.dispatcher=experts_in_tp"]),
    "fsdp_dp2_alltoall": (2, [*MOE, "parallel.dp_type=fsdp", "moe.dispatcher=alltoall"]),
    "pp2": (2, ["parallel.pp=2", "model.tie_embeddings=false"]),
}


def measure_rank(dataset_dir, output_dir, overrides):
    """(estimated, measured) parameter and AdamW-moment bytes of this rank after one step."""
    from torch.distributed.tensor import DTensor

    from ppmoe.train import Trainer

    trainer = Trainer(tiny_config(dataset_dir, output_dir, [*overrides, "train.steps=1", "train.warmup_steps=0"]))
    trainer.fit()
    rt = trainer.current
    params = {id(p): p for p in rt.model.parameters()}.values()

    def nbytes(t):
        local = t.to_local() if isinstance(t, DTensor) else t
        return local.numel() * local.element_size()

    measured = {"params": sum(nbytes(p) for p in params),
                "optimizer": sum(nbytes(s[k]) for s in rt.optimizer.state.values() for k in ("exp_avg", "exp_avg_sq"))}
    _, batch = resolve_layout(rt.stage.cfg, rt.dims.world_size)
    estimate = estimate_memory(rt.stage.shape, rt.stage.cfg, rt.dims, batch, "cpu",
                               pp_rank=rt.mesh["pp"].get_local_rank(), dp_rank=rt.dp_rank)
    return {"measured": measured, "estimated": {"params": estimate.params, "optimizer": estimate.optimizer}}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_parameter_bytes_equal_the_built_models(layout, tiny_dataset, tmp_path):
    world, overrides = LAYOUTS[layout]
    ranks = run_ranks(measure_rank, world, tiny_dataset, str(tmp_path), overrides)
    for rank, got in enumerate(ranks):
        assert got["measured"]["params"] > 0
        assert got["estimated"] == got["measured"], f"{layout} rank {rank}"
    if layout == "fsdp_dp2_alltoall":  # the uneven split: rank 0 holds the shared-expert gate's one row
        assert ranks[0]["measured"]["params"] > ranks[1]["measured"]["params"]


def test_chunk_size_is_torch_chunks():
    import torch

    for n, pieces in [(5, 2), (1, 2), (7, 3), (8, 4), (2, 4)]:
        sizes = [c.shape[0] for c in torch.arange(n).chunk(pieces)]
        sizes += [0] * (pieces - len(sizes))
        assert [chunk_size(n, pieces, i) for i in range(pieces)] == sizes


# ---- activations: a 350M GPT shape at seq 2048 (no process needed)

def gpt_350m(*overrides):
    cfg = load_config("configs/gpt_350m_8gpu.yaml", list(overrides))
    return cfg, model_shape(cfg, cfg.data.vocab_size, "cuda")


def activations(world, *overrides):
    cfg, shape = gpt_350m(*overrides)
    dims, batch = resolve_layout(cfg, world)
    return activation_bytes(shape, cfg, dims, batch, "cuda")


def test_recomputation_orders_the_activations():
    none = activations(8, "train.activation_checkpointing=none")
    per_op = activations(8, "train.activation_checkpointing=selective")
    every_other = activations(8, "train.activation_checkpointing=selective", "train.ac_every=2")
    full = activations(8, "train.activation_checkpointing=full")
    assert full < per_op < none
    assert full < every_other < none


def test_sequence_parallel_divides_the_residual_stream_by_tp():
    cfg, shape = gpt_350m("parallel.sequence_parallel=true")
    plain, _ = gpt_350m("parallel.sequence_parallel=false")  # the shipped config has it on
    # full recomputation keeps only each layer's input: the sequence-sharded residual stream
    assert layer_activations(shape, 0, cfg, 2, 2).full == layer_activations(shape, 0, plain, 1, 2).full / 2
    assert layer_activations(shape, 0, cfg, 2, 2).none < layer_activations(shape, 0, plain, 2, 2).none
    assert activations(8, "parallel.sequence_parallel=true") < activations(8, "parallel.sequence_parallel=false")


def test_tensor_parallel_and_bf16_shrink_activations():
    assert activations(8, "parallel.tp=4") < activations(8)  # tp 4 x dp 2 against tp 2 x dp 4
    assert activations(8, "train.dtype=bf16") < activations(8, "train.dtype=fp32")


def test_pipeline_first_stage_holds_pp_micro_batches_under_1f1b():
    cfg, shape = gpt_350m("parallel.tp=1", "parallel.pp=4", "train.micro_batch_size=4")
    dims, batch = resolve_layout(cfg, 8)  # pp 4 x dp 2: 256 / (4 * 2) = 32 micro-batches
    assert [micro_batches_in_flight(cfg, dims, batch, r) for r in range(4)] == [4, 3, 2, 1]
    gpipe, _ = gpt_350m("parallel.tp=1", "parallel.pp=4", "train.micro_batch_size=4", "parallel.pp_schedule=gpipe")
    assert micro_batches_in_flight(gpipe, dims, batch, 3) == 32
    first, last = (activation_bytes(shape, cfg, dims, batch, "cuda", r) for r in (0, 3))
    assert first > last


def test_memory_report_line(tiny_dataset):
    cfg = tiny_config(tiny_dataset, "unused", ["train.activation_checkpointing=selective"])
    plan = build_stage_plan(cfg, 300, "cpu")
    lines = memory_report(plan, 1, "cpu")
    assert len(lines) == 1
    assert lines[0].startswith("memory estimate per rank: params ") and "(selective AC) = " in lines[0]
    assert " of " not in lines[0]  # no device total on CPU
    assert lines[0].endswith("MiB")  # a tiny model: MiB, not "0.0 GiB"


def test_parallelism_divides_what_it_should():
    """Against one GPU (the 350M shape, FSDP unless said): tp divides parameters, optimizer and
    activations; FSDP dp divides parameters and optimizer but not activations; DDP divides nothing; pp=2
    halves the layers a rank keeps."""
    def estimate(world, *overrides):
        cfg, shape = gpt_350m(*overrides)
        dims, batch = resolve_layout(cfg, world)
        return estimate_memory(shape, cfg, dims, batch, "cuda")

    one = estimate(1, "parallel.tp=1")
    tp2 = estimate(2, "parallel.tp=2")
    fsdp8 = estimate(8, "parallel.tp=1")
    ddp8 = estimate(8, "parallel.tp=1", "parallel.dp_type=ddp")
    pp2 = estimate(2, "parallel.tp=1", "parallel.pp=2")
    assert one.optimizer == 2 * one.params == 8 * 370_721_792  # fp32 master weights, two fp32 moments
    # TP: everything but the norms' weights (2 d_model per layer and the final norm: replicated)
    replicated = (2 * 24 + 1) * 1024 * 4
    assert tp2.params == (one.params - replicated) / 2 + replicated
    assert tp2.activations < 0.6 * one.activations
    assert fsdp8.params == pytest.approx(one.params / 8, rel=1e-3)  # torch.chunk rounding of dim 0
    assert fsdp8.optimizer == 2 * fsdp8.params and fsdp8.activations == one.activations
    assert ddp8.params == one.params and ddp8.activations == one.activations
    # the embedding on rank 0, the final norm and head on rank 1: the largest rank keeps about half
    assert 0.45 * one.params < pp2.params < 0.55 * one.params


@pytest.mark.parametrize("config, gpus", [("configs/gpt_350m_8gpu.yaml", 8), ("configs/moe_gpt3_medium_64e_tp8.yaml", 8),
                                          ("configs/moe_143b_tp8_pp16.yaml", 128)])
def test_cli_estimates_the_shipped_gpu_configs(config, gpus, capsys):
    """`ppmoe estimate CONFIG`: the world each config is written for by default, bf16 ('auto' on a GPU),
    and every shipped GPU config fits an 80 GiB GPU without recomputation."""
    from ppmoe.cli import main

    assert main(["estimate", config]) == 0
    head, line = capsys.readouterr().out.splitlines()
    assert head.startswith(f"world {gpus} = ") and "bf16 compute" in head
    assert "(no AC) = " in line and line.endswith(" GiB of 80 GiB")
    total = float(line.split(" = ")[1].split()[0])
    assert 5 < total < 80
    assert main(["estimate", config, "--gpu-memory-gib", "4"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("or add tp / pp / FSDP dp)")
    assert main(["estimate", config, "--set", "train.activation_checkpointing=full"]) == 0
    assert float(capsys.readouterr().out.split(" = ")[-1].split()[0]) < total


def test_cli_estimate_refuses_a_world_the_config_cannot_use(capsys):
    from ppmoe.cli import main

    assert main(["estimate", "configs/moe_143b_tp8_pp16.yaml", "--gpus", "64"]) == 2
    assert "world size 64 is not divisible by parallel.tp * parallel.pp = 8 * 16" in capsys.readouterr().err


# ---- the CUDA allocator

def test_expandable_segments_unless_the_user_chose():
    assert allocator_settings({}) == EXPANDABLE_SEGMENTS == "expandable_segments:True"
    assert allocator_settings({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}) is None
    assert allocator_settings({"PYTORCH_ALLOC_CONF": "expandable_segments:False"}) is None


def start_and_read_alloc_conf():
    from ppmoe.parallel import init_distributed

    init_distributed()
    return os.environ.get("PYTORCH_CUDA_ALLOC_CONF")


def test_cpu_start_leaves_the_allocator_alone():
    assert run_ranks(start_and_read_alloc_conf, 1) == [os.environ.get("PYTORCH_CUDA_ALLOC_CONF")]


def test_configure_cuda_allocator_sets_expandable_segments_once(monkeypatch):
    """What init_distributed runs on a GPU before the first allocation (the runtime setter recorded here)."""
    import torch

    from ppmoe.parallel.distributed import configure_cuda_allocator

    applied = []
    monkeypatch.setattr(torch.cuda.memory, "_set_allocator_settings", applied.append)
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.delenv(name, raising=False)
    configure_cuda_allocator()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True" and applied == [EXPANDABLE_SEGMENTS]
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    configure_cuda_allocator()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128" and applied == [EXPANDABLE_SEGMENTS]
