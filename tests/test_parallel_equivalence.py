"""TP and DP runs against the single-process reference: same losses, grad norms and gradients.

Every run trains the same tiny GPT on the same data and seed for STEPS optimizer steps; the global batch
(8 sequences) is identical, only how it is split differs (micro-batches, DP ranks, TP shards).
Tolerance: fp32 on CPU, where the only difference is summation order (TP all-reduces partial sums,
DP averages per-rank means): losses and grad norms to 1e-5 relative, each gradient element to GRAD_TOL
times the largest entry of its tensor.
"""

import pytest
import torch
from torch.distributed.tensor import DTensor

from multiproc import run_ranks
from ppmoe.config import load_config
from ppmoe.train import Trainer

STEPS = 3
GRAD_TOL = 5e-4


def tiny_config(dataset_dir, output_dir, overrides=()):
    base = [
        f"output_dir={output_dir}", f"data.dataset_dir={dataset_dir}",
        "model.n_layers=2", "model.d_model=32", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden=64",
        f"train.steps={STEPS}", "train.seq_len=16", "train.global_batch_size=8", "train.micro_batch_size=2",
        "train.log_every=1", "train.val_every=0", "train.warmup_steps=1", "train.lr=1e-2",
        "checkpoint.save_final=false",
    ]
    return load_config(None, base + list(overrides))


def full_grads(model):
    """{parameter name: full gradient} with TP/FSDP shards gathered."""
    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        out[name] = (g.full_tensor() if isinstance(g, DTensor) else g).detach().clone()
    return out


def train_and_report(dataset_dir, output_dir, overrides):
    trainer = Trainer(tiny_config(dataset_dir, output_dir, overrides))
    result = trainer.fit()
    grads = full_grads(trainer.model)
    from ppmoe.train.metrics import read_metrics
    import torch.distributed as dist

    if dist.get_rank() != 0:
        return None
    metrics = read_metrics(f"{output_dir}/metrics.jsonl")
    return {"losses": [metrics[s]["loss"] for s in range(1, STEPS + 1)],
            "moe": [metrics[s].get("aux_loss") for s in range(1, STEPS + 1)]
            + [metrics[s].get("z_loss") for s in range(1, STEPS + 1)],
            "grad_norms": [metrics[s]["grad_norm"] for s in range(1, STEPS + 1)],
            "grads": grads, "result_losses": result.losses}


def train_and_report_all_ranks(dataset_dir, output_dir, overrides):
    """Rank 0's report (losses, norms) plus every rank's own gradients, keyed by parameter name; with
    pipelining each rank holds a different part of the model. Ranks of one TP/DP group gather the same
    full gradients, so the union is the whole model's."""
    import torch.distributed as dist

    trainer = Trainer(tiny_config(dataset_dir, output_dir, overrides))
    trainer.fit()
    grads = full_grads(trainer.model)
    if dist.get_rank() != 0:
        return grads
    from ppmoe.train.metrics import read_metrics

    metrics = read_metrics(f"{output_dir}/metrics.jsonl")
    return {**grads, "losses": [metrics[s]["loss"] for s in range(1, STEPS + 1)],
            "grad_norms": [metrics[s]["grad_norm"] for s in range(1, STEPS + 1)],
            "moe": [metrics[s].get("aux_loss") for s in range(1, STEPS + 1)]
            + [metrics[s].get("z_loss") for s in range(1, STEPS + 1)]}


@pytest.fixture(scope="module")
def reference(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    return run_ranks(train_and_report, 1, tiny_dataset, str(out), [])[0]


# Pipeline-MoE in the model: 4 experts, top-2, a shared expert, MoE in every layer.
MOE = ["moe.num_experts=4", "moe.top_k=2", "moe.shared_expert_hidden=32", "moe.dispatcher=experts_in_tp"]


@pytest.fixture(scope="module")
def moe_reference(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("moe_reference")
    return run_ranks(train_and_report, 1, tiny_dataset, str(out), MOE)[0]


LAYOUTS = {
    "tp2": (2, ["parallel.tp=2"]),
    "dp2_fsdp": (2, ["parallel.dp_type=fsdp"]),
    "dp2_ddp": (2, ["parallel.dp_type=ddp"]),
    "tp2_dp2_fsdp": (4, ["parallel.tp=2", "parallel.dp_type=fsdp"]),
    "tp2_dp2_ddp_accum": (4, ["parallel.tp=2", "parallel.dp_type=ddp", "train.micro_batch_size=1"]),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_matches_single_process(layout, reference, tiny_dataset, tmp_path):
    world, overrides = LAYOUTS[layout]
    got = run_ranks(train_and_report, world, tiny_dataset, str(tmp_path), overrides)[0]

    # The reference must actually learn, else matching it proves little.
    assert reference["losses"][-1] < reference["losses"][0]
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(reference["losses"]), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(got["grad_norms"]), torch.tensor(reference["grad_norms"]),
                               rtol=1e-5, atol=0)
    assert got["grads"].keys() == reference["grads"].keys()
    for name, ref in reference["grads"].items():
        assert ref.abs().max() > 0, name
        torch.testing.assert_close(got["grads"][name], ref, rtol=0, atol=GRAD_TOL * ref.abs().max().item(),
                                   msg=lambda m: f"{layout} gradient of {name}: {m}")


MOE_LAYOUTS = {
    "moe_tp2": (2, ["parallel.tp=2"]),
    "moe_tp4": (4, ["parallel.tp=4", "model.n_kv_heads=4"]),
    "moe_tp2_dp2_fsdp": (4, ["parallel.tp=2"]),
    # Same micro-batches as the reference (the load-balancing loss is a statistic of each micro-batch,
    # so only its scale, not its value, can be independent of the micro-batch size).
    "moe_dp2_ddp": (2, ["parallel.dp_type=ddp"]),
    # The all-to-all baseline: experts spread over the DP ranks (owned, not reduced by DP).
    "moe_alltoall_dp2_fsdp": (2, ["moe.dispatcher=alltoall"]),
    "moe_alltoall_dp4_ddp": (4, ["moe.dispatcher=alltoall", "parallel.dp_type=ddp", "train.micro_batch_size=2"]),
}


@pytest.mark.parametrize("layout", sorted(MOE_LAYOUTS))
def test_pipeline_moe_layout_matches_single_process(layout, moe_reference, tiny_dataset, tmp_path):
    """Losses, grad norms and every gradient (experts, routers, shared experts) match; the aux losses
    are part of the objective, so router gradients include them."""
    world, overrides = MOE_LAYOUTS[layout]
    ref = moe_reference
    if "model.n_kv_heads=4" in overrides:  # tp=4 needs 4 KV heads: compare with its own reference
        ref = run_ranks(train_and_report, 1, tiny_dataset, str(tmp_path / "ref"), [*MOE, "model.n_kv_heads=4"])[0]
    got = run_ranks(train_and_report, world, tiny_dataset, str(tmp_path / "run"), [*MOE, *overrides])[0]
    assert ref["losses"][-1] < ref["losses"][0]
    assert any("experts.w1" in name for name in ref["grads"])
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(got["grad_norms"]), torch.tensor(ref["grad_norms"]), rtol=1e-5, atol=0)
    for name, g in ref["grads"].items():
        torch.testing.assert_close(got["grads"][name], g, rtol=0, atol=GRAD_TOL * g.abs().max().item(),
                                   msg=lambda m: f"{layout} gradient of {name}: {m}")
    assert got["moe"] == pytest.approx(ref["moe"], rel=1e-5)


def test_tied_embeddings_under_tp(reference, tiny_dataset, tmp_path):
    """A tied table is sharded once and serves both the lookup and the output projection."""
    ref = run_ranks(train_and_report, 1, tiny_dataset, str(tmp_path / "ref"), ["model.tie_embeddings=true"])[0]
    got = run_ranks(train_and_report, 2, tiny_dataset, str(tmp_path / "tp"),
                    ["model.tie_embeddings=true", "parallel.tp=2"])[0]
    assert "output.weight" not in ref["grads"]  # one parameter, one gradient
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=0)
    g_ref, g_tp = ref["grads"]["tok_embeddings.weight"], got["grads"]["tok_embeddings.weight"]
    torch.testing.assert_close(g_tp, g_ref, rtol=0, atol=GRAD_TOL * g_ref.abs().max().item())


# ---- pipeline parallelism: 4 layers so that 4 stages have one layer each -------------------------------
PP_BASE = ["model.n_layers=4"]
PP_LAYOUTS = {
    "pp2_1f1b": (2, ["parallel.pp=2"]),
    "pp2_gpipe": (2, ["parallel.pp=2", "parallel.pp_schedule=gpipe"]),
    "pp4_1f1b": (4, ["parallel.pp=4"]),
    "pp2_explicit_layers": (2, ["parallel.pp=2", "parallel.pp_layers=[3,1]"]),
    "pp2_interleaved": (2, ["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b",
                            "parallel.pp_virtual_stages=2"]),
    "moe_pp2_1f1b": (2, [*MOE, "parallel.pp=2"]),
    "moe_tp2_pp2_dp2": (8, [*MOE, "parallel.tp=2", "parallel.pp=2"]),
}


@pytest.fixture(scope="module")
def pp_references(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("pp_reference")
    return {"dense": run_ranks(train_and_report, 1, tiny_dataset, str(out / "dense"), PP_BASE)[0],
            "moe": run_ranks(train_and_report, 1, tiny_dataset, str(out / "moe"), [*PP_BASE, *MOE])[0]}


@pytest.mark.parametrize("layout", sorted(PP_LAYOUTS))
def test_pipeline_layout_matches_single_process(layout, pp_references, tiny_dataset, tmp_path):
    """Pipeline stages (1F1B, GPipe, interleaved 1F1B; with TP, DP and Pipeline-MoE inside): same losses,
    grad norms, gradients and MoE aux losses as one process. Every rank holds only its stages'
    parameters; together they cover the model exactly once."""
    world, overrides = PP_LAYOUTS[layout]
    ref = pp_references["moe" if layout.startswith("moe") else "dense"]
    per_rank = run_ranks(train_and_report_all_ranks, world, tiny_dataset, str(tmp_path), [*PP_BASE, *overrides])
    got = per_rank[0]  # rank 0 logs
    grads = {}
    for rank_grads in per_rank:
        grads.update({k: v for k, v in rank_grads.items() if k not in ("losses", "grad_norms", "moe")})
    assert sorted(grads) == sorted(ref["grads"])
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(got["grad_norms"]), torch.tensor(ref["grad_norms"]), rtol=1e-5, atol=0)
    for name, g in ref["grads"].items():
        torch.testing.assert_close(grads[name], g, rtol=0, atol=GRAD_TOL * g.abs().max().item(),
                                   msg=lambda m: f"{layout} gradient of {name}: {m}")
    if layout.startswith("moe"):
        assert got["moe"] == pytest.approx(ref["moe"], rel=1e-5)
