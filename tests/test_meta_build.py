"""Building at scale: the model is built on the meta device, split and sharded there, and each rank
materialises only its own shards, initialised so that every layout starts from the same weights as one
process; a rank of a tp x pp layout holds about 1/(tp*pp) of the parameters and never allocates the rest."""

import resource

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from multiproc import run_ranks
from ppmoe.model import build_model, count_parameters
from ppmoe.model.init import ROWS_PER_SEED, normal_shard
from test_parallel_equivalence import tiny_config


@pytest.mark.parametrize("shape, local, offset", [
    ((300, 40), (300, 40), (0, 0)),
    ((300, 40), (150, 40), (150, 0)),       # a column-parallel shard (rows)
    ((300, 40), (300, 20), (0, 20)),        # a row-parallel shard (columns)
    ((8, 40, 30), (2, 40, 30), (4, 0, 0)),  # two whole experts of a stack
    ((8, 40, 30), (8, 13, 30), (0, 7, 0)),  # FSDP's uneven cut inside every expert
    ((300, 40), (0, 40), (300, 0)),         # an empty shard
])
def test_a_shard_is_the_slice_of_the_whole(shape, local, offset):
    whole = normal_shard(5, "w", 0.02, shape, shape, (0,) * len(shape))
    part = normal_shard(5, "w", 0.02, shape, local, offset)
    expected = whole[tuple(slice(o, o + n) for o, n in zip(offset, local))]
    assert torch.equal(part, expected)


def test_draws_depend_on_seed_and_name_and_have_the_std():
    shape = (4 * ROWS_PER_SEED, 256)
    a = normal_shard(1, "layers.0.attention.wq.weight", 0.02, shape, shape, (0, 0))
    assert abs(a.std().item() - 0.02) < 0.001 and abs(a.mean().item()) < 0.001
    assert not torch.equal(a, normal_shard(2, "layers.0.attention.wq.weight", 0.02, shape, shape, (0, 0)))
    assert not torch.equal(a, normal_shard(1, "layers.1.attention.wq.weight", 0.02, shape, shape, (0, 0)))
    rows = a.view(4, ROWS_PER_SEED, 256)  # blocks of rows have their own streams
    assert not torch.equal(rows[0], rows[1])


MOE = ["moe.num_experts=4", "moe.top_k=2", "model.n_layers=4"]


def fresh_full_params(dataset_dir, output_dir, overrides):
    """This layout's freshly built (untrained) parameters, gathered to full tensors on rank 0."""
    from ppmoe.train import Trainer

    trainer = Trainer(tiny_config(dataset_dir, output_dir, overrides))
    params = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
              for n, p in trainer.model.named_parameters()}
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, params)  # pipeline ranks hold different layers
        for part in gathered:
            params.update(part)
    return params


@pytest.mark.parametrize("world, layout", [
    (4, ["parallel.tp=2", "parallel.pp=2"]),
    (4, ["parallel.tp=2", "parallel.dp=2"]),                       # FSDP over TP shards
    (2, ["parallel.dp=2", "moe.dispatcher=alltoall"]),              # experts owned per data-parallel rank
    (2, ["parallel.pp=2", "model.tie_embeddings=false"]),
], ids=["tp2_pp2", "tp2_fsdp2", "alltoall_dp2", "pp2"])
def test_every_layout_starts_from_the_one_process_weights(world, layout, tiny_dataset, tmp_path):
    single = run_ranks(fresh_full_params, 1, tiny_dataset, str(tmp_path / "one"), MOE)[0]
    sharded = run_ranks(fresh_full_params, world, tiny_dataset, str(tmp_path / "many"), [*MOE, *layout])[0]
    assert single.keys() == sharded.keys()
    for name, value in single.items():
        assert torch.equal(value, sharded[name]), name


BIG = ["model.n_layers=4", "model.d_model=512", "model.n_heads=8", "model.n_kv_heads=8", "model.ffn_hidden=1024",
       "model.vocab_size=8192", "moe.num_experts=8", "moe.top_k=2", "moe.expert_hidden=1024",
       "moe.dispatcher=experts_in_tp", "parallel.tp=2", "parallel.pp=2", "train.global_batch_size=8"]


def share_and_peak(dataset_dir, output_dir, overrides):
    """(bytes of this rank's parameters, growth of the process's peak memory while building the stage)."""
    from ppmoe.train import Trainer

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    trainer = Trainer(tiny_config(dataset_dir, output_dir, overrides))
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    held = sum((p.to_local() if isinstance(p, DTensor) else p).numel() * 4
               for p in {id(p): p for p in trainer.model.parameters()}.values())
    return held, grown


def test_a_tp2_pp2_rank_holds_its_share_and_never_the_whole_model(tiny_dataset, tmp_path):
    """A scaled-down copy of configs/moe_143b_tp8_pp16.yaml's layout (Pipeline-MoE experts inside the TP
    group, pipeline stages): ~63M parameters (252 MB fp32), 4 ranks."""
    cfg = tiny_config(tiny_dataset, tmp_path, BIG)
    from ppmoe.model import model_shape
    whole = count_parameters(model_shape(cfg, 300)) * 4
    results = run_ranks(share_and_peak, 4, tiny_dataset, str(tmp_path), BIG)
    for rank, (held, grown) in enumerate(results):
        assert 0.8 * whole / 4 < held < 1.4 * whole / 4, (rank, held / whole)
        # The old way (every rank builds the whole model, then a stage deep-copies it) grew by >= 1.25x whole.
        assert grown < 0.6 * whole, (rank, grown / whole)
