"""Patch-level training: the patch input and next-patch loss against their formulas, K=1 against the
token trainer bit for bit, the patch -> token switch (also killed and resumed on either side of it),
and tensor / pipeline parallel runs against one process."""

import signal

import pytest
import torch

from multiproc import run_ranks, run_ranks_expecting_death
from patchtrain import mean_pool_patches, patch_cross_entropy, to_patch_batch
from patchtrain.loss import expanded_cross_entropy
from ppmoe.config import load_config
from ppmoe.train.checkpoint import complete_checkpoints
from ppmoe.train.metrics import read_metrics
from ppmoe.train.plan import build_stage_plan
from test_parallel_equivalence import full_grads, tiny_config
from test_resume import die_before_step, run_killed

STEPS = 12  # K=4, lambda=2/3: 4 patch steps then 8 token steps (0.5x the compute of 24 token steps)
PATCH = ["patch.size=4", "patch.fraction=0.6667", f"train.steps={STEPS}", "train.warmup_steps=2"]


# ---- the formulas ----------------------------------------------------------------------------------
def test_patch_embedding_is_the_mean_of_k_token_embeddings():
    torch.manual_seed(0)
    emb = torch.randn(2, 12, 5, requires_grad=True)
    pooled = mean_pool_patches(emb, 3)
    by_hand = torch.stack([torch.stack([sum(emb[b, 3 * i + k] for k in range(3)) / 3 for i in range(4)])
                           for b in range(2)])
    torch.testing.assert_close(pooled, by_hand)
    upstream = torch.randn_like(pooled)
    (grad,) = torch.autograd.grad((pooled * upstream).sum(), emb)
    torch.testing.assert_close(grad, upstream.repeat_interleave(3, dim=1) / 3)  # each token gets 1/K
    with pytest.raises(ValueError, match="whole number of patches"):
        mean_pool_patches(emb, 5)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_next_patch_loss_matches_the_formula(k):
    torch.manual_seed(k)
    n, v = 6, 11
    logits = (3 * torch.randn(n, v)).requires_grad_()
    targets = torch.randint(0, v, (n, k))
    targets[0, :] = targets[0, 0]  # repeated targets within a patch count once each
    # L = -(1/K) sum_k log softmax(logits)[target_k], averaged over positions
    log_p = torch.log_softmax(logits.double(), dim=-1)
    by_hand = -sum(log_p[i, targets[i, j]] for i in range(n) for j in range(k)) / (n * k)
    loss = patch_cross_entropy(logits, targets)
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-6)
    (grad,) = torch.autograd.grad(loss, logits)
    # d/dlogits = (softmax - mean of the K one-hots) / N
    one_hots = torch.zeros(n, v, dtype=torch.float64).scatter_add_(1, targets, torch.ones(n, k, dtype=torch.float64))
    expected = (log_p.exp() - one_hots / k) / n
    torch.testing.assert_close(grad.double(), expected, rtol=1e-5, atol=1e-7)
    expanded = expanded_cross_entropy(logits, targets)
    assert expanded.item() == pytest.approx(loss.item(), rel=1e-6)


def test_patch_batches_target_the_next_patch():
    tokens = torch.arange(100).view(1, 100)
    k, t = 4, 3
    window = tokens[:, : k * t + k]  # what the loader's window holds
    inputs, targets = to_patch_batch(window[:, :-1], window[:, 1:], t, k)
    assert inputs.tolist() == [list(range(12))]
    assert targets.tolist() == [[[4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]]  # patch i -> patch i+1


def test_phase_plan_gives_lambda_of_the_tokens_at_half_the_compute():
    plan = build_stage_plan(load_config(None, ["patch.size=4", "patch.fraction=0.6667", "train.steps=300"]), 300)
    patch, token = plan.stages
    assert (patch.steps, token.steps) == (100, 200)
    assert (patch.phase, token.phase, patch.patch_size, token.patch_size) == ("patch", "token", 4, 1)
    patch_tokens, token_tokens = 4 * patch.steps, token.steps  # in units of one token step's tokens
    assert patch_tokens / (patch_tokens + token_tokens) == pytest.approx(2 / 3)
    assert (patch.steps + token.steps) / (patch_tokens + token_tokens) == pytest.approx(0.5)  # lambda/K + 1 - lambda
    assert patch.tokens_per_step == 4 * token.tokens_per_step and patch.flops_per_step == token.flops_per_step
    cfg = load_config(None, ["patch.size=4", "patch.fraction=0.6667", "train.steps=300", "train.warmup_steps=10"])
    plan = build_stage_plan(cfg, 300)
    assert plan.lr(10) == pytest.approx(cfg.train.lr)  # patch warmup ends
    assert plan.lr(100) == pytest.approx(cfg.train.min_lr)  # patch cosine ends
    assert plan.lr(101) == pytest.approx(cfg.train.lr / 10)  # token phase warms up again


# ---- training ------------------------------------------------------------------------------------
def train(dataset_dir, output_dir, overrides, kill_at_step=None):
    from ppmoe.train import Trainer

    trainer = Trainer(tiny_config(dataset_dir, output_dir, overrides))
    if kill_at_step is not None:
        die_before_step(trainer, kill_at_step)
    trainer.fit()
    return full_grads(trainer.model)


def curve(run_dir):
    return {s: m for s, m in read_metrics(run_dir / "metrics.jsonl").items() if "loss" in m}


def test_k1_is_bit_for_bit_the_token_trainer(tiny_dataset, tmp_path):
    """K=1 through the whole patch machinery (hook, patch batches, loss factory, the switch with the
    optimizer and schedule kept) trains exactly like ordinary training."""
    k1 = ["patch.size=1", "patch.fraction=0.5", "patch.reset_optimizer=false", "patch.reset_schedule=false",
          "train.steps=6"]
    grads_k1 = run_ranks(train, 1, tiny_dataset, str(tmp_path / "k1"), k1)[0]
    grads_tok = run_ranks(train, 1, tiny_dataset, str(tmp_path / "tok"), ["train.steps=6"])[0]
    a, b = curve(tmp_path / "k1"), curve(tmp_path / "tok")
    assert [a[s]["phase"] for s in sorted(a)] == ["patch"] * 3 + ["token"] * 3
    assert [a[s]["loss"] for s in sorted(a)] == [b[s]["loss"] for s in sorted(b)]
    for name in grads_tok:
        assert torch.equal(grads_k1[name], grads_tok[name]), name


@pytest.fixture(scope="module")
def patch_run(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("patch_run")
    grads = run_ranks(train, 1, tiny_dataset, str(out), PATCH)[0]
    return out, grads


def test_patch_then_token_phase_in_one_run(patch_run):
    out, _ = patch_run
    metrics = curve(out)
    assert [metrics[s]["phase"] for s in range(1, STEPS + 1)] == ["patch"] * 4 + ["token"] * 8
    # tokens are counted in tokens: a patch step reads K times a token step's tokens
    seen = [metrics[s]["tokens_seen"] for s in range(1, STEPS + 1)]
    assert seen[1] - seen[0] == 4 * (seen[5] - seen[4])
    flops = [metrics[s]["flops"] for s in range(1, STEPS + 1)]
    assert flops[1] - flops[0] == pytest.approx(flops[5] - flops[4])  # same compute per step
    assert metrics[5]["lr"] < metrics[6]["lr"]  # the token phase warms up from scratch
    assert metrics[STEPS]["loss"] < metrics[5]["loss"]
    # the switch is a checkpoint boundary (the run keeps the newest 3)
    assert "step_00000004" in [p.name for p in complete_checkpoints(out / "checkpoints")]


@pytest.mark.parametrize("kill_at", [3, 6], ids=["killed_in_patch_phase", "killed_in_token_phase"])
def test_kill_and_resume_around_the_switch(kill_at, patch_run, tiny_dataset, tmp_path):
    out, _ = patch_run
    common = [*PATCH, "checkpoint.every=2"]
    assert run_killed(1, tiny_dataset, str(tmp_path), common, kill_at) == [-signal.SIGKILL]
    saved = [p.name for p in complete_checkpoints(tmp_path / "checkpoints")]
    assert saved[-1] == ("step_00000002" if kill_at == 3 else "step_00000004")  # 4 = the switch
    run_ranks(train, 1, tiny_dataset, str(tmp_path), common)
    resumed, straight = curve(tmp_path), curve(out)
    for step in range(1, STEPS + 1):
        assert resumed[step]["loss"] == straight[step]["loss"], step
        assert resumed[step]["phase"] == straight[step]["phase"]


@pytest.mark.parametrize("world,layout", [(2, ["parallel.tp=2"]), (2, ["parallel.pp=2", "model.n_layers=2"])],
                         ids=["tp2", "pp2"])
def test_parallel_patch_training_matches_one_process(world, layout, patch_run, tiny_dataset, tmp_path):
    """TP=2 (vocabulary-parallel next-patch loss) and PP=2 (patch input on the first stage, loss on
    the last) give the one-process losses in both phases and the same final gradients."""
    out, grads = patch_run
    got = run_ranks(train, world, tiny_dataset, str(tmp_path), [*PATCH, *layout])
    merged = {}
    for rank_grads in got:
        merged.update(rank_grads)
    straight, parallel = curve(out), curve(tmp_path)
    for step in range(1, STEPS + 1):
        assert parallel[step]["loss"] == pytest.approx(straight[step]["loss"], rel=1e-5), step
    for name, g in grads.items():
        torch.testing.assert_close(merged[name], g, rtol=0, atol=5e-4 * g.abs().max().item())


# ---- one data order for both phases --------------------------------------------------------------
def chunked(dataset, k, t, batch, rank=0, dp=1, seed=3, patch=True):
    """The run's loader for a K-patch stage (patch=True) or the token stage after it (ppmoe.data.ChunkedLoader)."""
    from ppmoe.data import ChunkedLoader

    return ChunkedLoader(dataset, "train", k * (t + 1), (k if patch else 1) * (t + 1), batch, rank, dp, seed)


def test_token_phase_reads_what_the_patch_phase_did_not(tiny_dataset):
    k, t, batch = 4, 8, 4
    loader = chunked(tiny_dataset, k, t, batch)
    requested = []  # (offset, length) of every window the loader reads
    read = loader.stream.window
    loader.stream.window = lambda start, length: requested.append((start, length)) or read(start, length)
    chunk, epoch_windows = k * (t + 1), loader.num_chunks * k

    seen = set()
    for _ in range(loader.num_chunks // batch // 2):  # half an epoch at patch level
        x, y = loader.next_batch()
        assert x.shape == (batch, k * t + k - 1)  # what to_patch_batch expects
        for start, length in requested:
            assert start % chunk == 0 and length == chunk  # a patch sample is one whole chunk
            seen.update(start + j * (t + 1) for j in range(k))
        requested.clear()
    token = chunked(tiny_dataset, k, t, batch, patch=False)
    token.continue_from(loader)
    token.stream.window = loader.stream.window
    while token.epoch == 0:  # the rest of the epoch at token level (a batch is one chunk here)
        x, y = token.next_batch()
        assert x.shape == (batch, t) and torch.equal(x[:, 1:], y[:, :-1])
        for start, length in requested:
            assert length == t + 1 and start not in seen  # never a window the patch phase read
            seen.add(start)
        requested.clear()
    assert len(seen) == epoch_windows  # the epoch's chunks are covered exactly once


def test_aligned_loader_splits_over_dp_and_resumes(tiny_dataset):
    whole = chunked(tiny_dataset, 4, 8, 4, seed=1)
    halves = [chunked(tiny_dataset, 4, 8, 4, rank=r, dp=2, seed=1) for r in range(2)]
    for patch in (True, False):
        if not patch:
            previous = [whole, *halves]
            whole = chunked(tiny_dataset, 4, 8, 4, seed=1, patch=False)
            halves = [chunked(tiny_dataset, 4, 8, 4, rank=r, dp=2, seed=1, patch=False) for r in range(2)]
            for loader, before in zip([whole, *halves], previous):
                loader.continue_from(before)
        for _ in range(3):
            x, _ = whole.next_batch()
            assert torch.equal(torch.cat([h.next_batch()[0] for h in halves]), x)
    state = whole.state_dict()
    expected = whole.next_batch()
    again = chunked(tiny_dataset, 4, 8, 4, seed=1, patch=False)
    again.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(again.next_batch(), expected))


def vocab_parallel_loss_and_grad(logits, targets):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from patchtrain.vocab_parallel import vocab_parallel_patch_cross_entropy

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    sharded = distribute_tensor(logits.clone(), mesh, [Shard(1)]).requires_grad_()
    loss = vocab_parallel_patch_cross_entropy(sharded, targets)
    loss.backward()
    return loss.detach(), sharded.grad.full_tensor()


def test_vocab_parallel_patch_loss_matches_the_reference():
    """TP=2: the vocabulary-sharded next-patch loss (3 all-reduces, nothing gathered) equals the
    reference, duplicates and targets on both shards included."""
    torch.manual_seed(0)
    logits = 4 * torch.randn(6, 16)
    targets = torch.randint(0, 16, (6, 4))
    targets[0] = torch.tensor([1, 1, 15, 15])  # duplicates on both shards
    loss, grad = run_ranks(vocab_parallel_loss_and_grad, 2, logits, targets)[0]
    reference = logits.clone().requires_grad_()
    expected = patch_cross_entropy(reference, targets)
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    torch.testing.assert_close(grad, reference.grad, rtol=1e-5, atol=1e-7)


def train_writing_old_checkpoints(dataset_dir, output_dir, overrides, kill_at_step):
    """Save checkpoints as ppmoe did before stage plans (no `stage`, no `probe_loss` in the trainer state),
    then SIGKILL before `kill_at_step`."""
    from ppmoe.train import Trainer

    trainer = Trainer(tiny_config(dataset_dir, output_dir, overrides))
    save = trainer.ckpt.save
    trainer.ckpt.save = lambda step, model, optimizer, state, attachments=None: save(
        step, model, optimizer, {k: v for k, v in state.items() if k not in ("stage", "probe_loss")})  # (no model.json)
    die_before_step(trainer, kill_at_step)
    trainer.fit()


def test_checkpoint_of_an_older_ppmoe_resumes_in_its_stage(patch_run, tiny_dataset, tmp_path):
    out, _ = patch_run
    common = [*PATCH, "checkpoint.every=3"]
    assert run_ranks_expecting_death(train_writing_old_checkpoints, 1, tiny_dataset, str(tmp_path), common, 8) == [
        -signal.SIGKILL]
    assert complete_checkpoints(tmp_path / "checkpoints")[-1].name == "step_00000006"  # in the token phase
    run_ranks(train, 1, tiny_dataset, str(tmp_path), common)
    resumed, straight = curve(tmp_path), curve(out)
    for step in range(7, STEPS + 1):
        assert resumed[step]["phase"] == "token" and resumed[step]["loss"] == straight[step]["loss"], step
