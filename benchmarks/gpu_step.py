"""One-GPU training step benchmark (issue 12): tokens/s, MFU and peak memory of real training steps, the MoE
block's time split against its dense FFN, and the triton patch loss against the torch reference.

    python benchmarks/gpu_step.py [--models dense_350m dense_1p3b moe_350m_16e] [--variants eager compile ...] \
        [--steps 10] [--warmup 3] [--out runs/bench/gpu_step.json]
    python benchmarks/gpu_step.py --smoke      # the same code path at tiny shapes on CPU, fp32 (for CI)

Without a CUDA GPU (and without --smoke) it prints one line saying what it needs and exits with code 2.

Training (section 1). Each (model, variant) row is a real training stage built the way `ppmoe train` builds
one: configs/gpt_350m_8gpu.yaml plus overrides -> ppmoe.config (load_config, validate) -> build_stage_plan ->
build_stage_runtime (meta-device model, parallelize, optimizer, loader, stage io) on one process, reading a
synthetic prepared dataset of random tokens (written to a temporary directory; no checkpoints, no metrics
files). A step is what Trainer.train_step does: next batch, learning rate, zero_grad, runner.train_step (the
micro-batches' forward and backward under train.dtype), global gradient-norm clipping, optimizer step; the
host waits for the device after each step, as the trainer does. `--warmup` steps (compilation included)
are dropped and the median of `--steps` timed steps is the step time.
  models   dense_350m     the 350M config (24 layers, d_model 1024, 16 heads, vocab 32768, untied)
           dense_1p3b     GPT-3 XL shape: 24 layers, d_model 2048, 16 heads (~1.3B)
           moe_350m_16e   the 350M backbone with 16 experts top-2 in every layer, expert_hidden = ffn_hidden / 2
                          (the same active parameters per token as dense_350m; ~1.8B in all)
  variants eager (the baseline), compile (train.compile), ac_selective_op / ac_selective_2 / ac_full
           (train.activation_checkpointing selective with train.ac_every 0 (per op) or 2, and full), and for
           the MoE model kernel_grouped_mm / kernel_padded_bmm / kernel_loop (moe.expert_kernel).
           The script only sets the keys: what they change is the trainer's business.
  bf16 (train.dtype), sequence 2048, global batch 8 sequences in micro-batches of 4 (2 for dense_1p3b).
  tokens/s = global_batch * seq_len / step time; model FLOPs per step from ppmoe.model.training_flops_per_token
  (6 x active matmul parameters + causal attention); MFU against (a) the measured bf16 matmul peak (a loop of
  large torch.mm at start) and (b) the data-sheet peak looked up by device name
  (ppmoe.model.peak_flops_per_device: H100/H200 989 TFLOP/s dense bf16; unknown elsewhere); peak memory is
  torch.cuda.max_memory_allocated over the row (build and steps). A row that runs out of memory runs
  again at half the micro-batch (the same tokens per step, accumulated), down to 1; a row that still fails
  says so and the others still run.

MoE block (section 2). A standalone MoEFeedForward (the local expert layout, the MoE model's shape, its
micro-batch of tokens) against a dense SwiGLU of the same active parameters (hidden = top_k x expert_hidden),
both forward + backward under bf16 autocast. The block's pieces are timed each on its own (forward +
backward, fed the previous piece's real output): router (gate, softmax, top-k, aux and z losses), permute
(sort by expert + gather of the token rows), experts (the kernel), combine (weighted scatter-add back to the
tokens); `sum of pieces` next to the whole block shows what the isolation misses. One row per expert kernel.
Device time comes from CUDA events (perf_counter on CPU), median of the iterations.

Patch loss (section 3). Forward + backward of the next-patch cross-entropy on [tokens, vocab] bf16 logits with
K = 4 targets per row: the fused triton kernel (patchtrain.kernels) against the torch reference
(patchtrain.reference_loss); the loss and gradient differences are reported as a check. With --smoke on CPU
the triton kernel runs in triton's interpreter (TRITON_INTERPRET=1), so its timing there means nothing.

Goals printed next to the results: dense MFU >= 50% and MoE MFU >= 40% on one H100 (against the data-sheet
peak, or the measured one when the device is not known), MoE block <= 1.15x its dense FFN, patch kernel faster
than torch. Writes JSON (every row, the peaks, the goals) and prints the tables. No PNG: nothing here is a curve.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from patchtrain.kernels import TRITON_AVAILABLE, triton_patch_cross_entropy  # noqa: E402
from patchtrain.reference_loss import patch_cross_entropy  # noqa: E402
from ppmoe.config import load_config, validate  # noqa: E402
from ppmoe.layers import SwiGLU  # noqa: E402
from ppmoe.model import count_parameters, peak_flops_per_device  # noqa: E402
from ppmoe.model.flops import matmul_params  # noqa: E402
from ppmoe.moe import MoEFeedForward, MoEShape  # noqa: E402
from ppmoe.moe.layout import LOCAL_EXPERTS  # noqa: E402
from ppmoe.moe.permute import combine, sort_by_expert  # noqa: E402
from ppmoe.parallel import clip_grad_norm, init_distributed, shutdown  # noqa: E402
from ppmoe.parallel.distributed import Runtime  # noqa: E402
from ppmoe.train.metrics import peak_memory_gib  # noqa: E402
from ppmoe.train.optim import set_lr  # noqa: E402
from ppmoe.train.plan import StagePlan, build_stage_plan  # noqa: E402
from ppmoe.train.stage_runtime import MeshCache, StageRuntime, build_stage_runtime  # noqa: E402

BASE_CONFIG = REPO / "configs/gpt_350m_8gpu.yaml"
NEEDS_GPU = ("benchmarks/gpu_step.py needs a CUDA GPU (torch.cuda.is_available() is False here); "
             "run it on one GPU, or pass --smoke for the tiny CPU check")

GOALS = {"dense_mfu": 0.50, "moe_mfu": 0.40, "moe_block_over_dense_ffn": 1.15, "patch_kernel_speedup": 1.0}

# name -> overrides of the base config (the shape; the batch comes from the Scale).
MODELS = {
    "dense_350m": [],
    "dense_1p3b": ["model.d_model=2048", "model.n_heads=16", "model.n_kv_heads=16"],
    "moe_350m_16e": ["moe.num_experts=16", "moe.top_k=2", "moe.every=1", "moe.expert_hidden=1376",
                     "moe.dispatcher=local", "moe.capacity_factor=null"],
}
# --smoke: the same models at toy sizes (the MoE keeps expert_hidden = ffn_hidden / top_k).
SMOKE_SHAPES = {
    "dense_350m": ["model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.n_kv_heads=4",
                   "model.ffn_hidden=128"],
    "dense_1p3b": ["model.n_layers=2", "model.d_model=128", "model.n_heads=4", "model.n_kv_heads=4",
                   "model.ffn_hidden=256"],
    "moe_350m_16e": ["model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.n_kv_heads=4",
                     "model.ffn_hidden=128", "moe.num_experts=4", "moe.expert_hidden=64"],
}
# name -> (overrides, whether it needs an MoE model).
VARIANTS = {
    "eager": ([], False),
    "compile": (["train.compile=true"], False),
    "ac_selective_op": (["train.activation_checkpointing=selective", "train.ac_every=0"], False),
    "ac_selective_2": (["train.activation_checkpointing=selective", "train.ac_every=2"], False),
    "ac_full": (["train.activation_checkpointing=full"], False),
    "kernel_grouped_mm": (["moe.expert_kernel=grouped_mm"], True),
    "kernel_padded_bmm": (["moe.expert_kernel=padded_bmm"], True),
    "kernel_loop": (["moe.expert_kernel=loop"], True),
}
EXPERT_KERNELS = ("grouped_mm", "padded_bmm", "loop")


@dataclass(frozen=True)
class Scale:
    """Sizes of one benchmark run: the GPU one, or the tiny CPU one of --smoke."""

    dtype: str  # train.dtype
    seq_len: int
    global_batch: int
    micro_batch: dict[str, int]  # per model
    vocab_size: int  # of the synthetic dataset
    matmul_n: int  # the peak measurement multiplies [n, n] x [n, n]
    matmul_iters: int
    block_iters: int  # timed iterations of each MoE piece and of the patch loss
    patch_targets: int  # K of the patch loss


GPU_SCALE = Scale("bf16", 2048, 8, {"dense_350m": 4, "dense_1p3b": 2, "moe_350m_16e": 4}, 32768, 8192, 50, 20, 4)
SMOKE_SCALE = Scale("fp32", 32, 4, {"dense_350m": 2, "dense_1p3b": 2, "moe_350m_16e": 2}, 256, 128, 3, 2, 2)

# ----------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> list[float]:
    """Seconds of device time of each of `iters` calls of `fn` after `warmup` calls: CUDA events on GPU
    (host gaps between calls excluded), perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    if device.type != "cuda":
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return times
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    synchronize(device)
    return [start.elapsed_time(end) / 1e3 for start, end in events]


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, n: int, iters: int) -> float:
    """Achieved FLOP/s of [n, n] @ [n, n] in `dtype` (2 n^3 FLOPs a product), the best of three loops of
    `iters` products: what this device's matmuls reach, the roof an MFU can be held against."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)

    def loop():
        for _ in range(iters):
            torch.mm(a, b, out=out)

    seconds = min(time_calls(loop, device, warmup=1, iters=3))
    return 2.0 * n ** 3 * iters / seconds


# ----------------------------------------------------------------------------- section 1: training steps


def write_synthetic_dataset(directory: Path, vocab_size: int, tokens: int, seed: int = 0) -> Path:
    """A prepared dataset (meta.json + one uint16/uint32 shard per split) of `tokens` uniform random token
    ids: what the loader reads, without a tokenizer or a download. Returns `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if vocab_size <= 2 ** 16 else np.uint32
    rng = np.random.default_rng(seed)
    shards = {}
    for split in ("train", "val"):
        name = f"{split}_000.bin"
        rng.integers(0, vocab_size, size=tokens, dtype=np.int64).astype(dtype).tofile(directory / name)
        shards[split] = [name]
    meta = {"format_version": 1, "vocab_size": vocab_size, "dtype": np.dtype(dtype).name, "eos_id": 0,
            "tokens": {"train": tokens, "val": tokens}, "shards": shards,
            "source": "benchmarks/gpu_step.py: uniform random tokens"}
    (directory / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def row_overrides(model: str, variant: str, scale: Scale, smoke: bool, dataset_dir: Path, out_dir: Path,
                  micro_batch: int | None = None) -> list[str]:
    """The --set list of one (model, variant) row: shape, batch (the model's micro-batch unless
    `micro_batch` is given), precision, then the variant's keys."""
    shape = MODELS[model] + (SMOKE_SHAPES[model] if smoke else [])
    run = [f"output_dir={out_dir}", f"data.dataset_dir={dataset_dir}", "parallel.tp=1", "parallel.pp=1",
           f"train.seq_len={scale.seq_len}", f"train.global_batch_size={scale.global_batch}",
           f"train.micro_batch_size={micro_batch or scale.micro_batch[model]}", f"train.dtype={scale.dtype}",
           "train.steps=1000", "train.warmup_steps=10", "train.val_every=0"]
    return shape + run + VARIANTS[variant][0]


def optimizer_step(runtime: StageRuntime, plan: StagePlan, step: int) -> float:
    """One optimizer step as Trainer.train_step takes it (1-based `step`); returns the loss. The host waits
    for the device at the end, as the trainer's loop does before it reads the clock."""
    inputs, targets = runtime.io.to_batch(*runtime.loader.next_batch())
    set_lr(runtime.optimizer, plan.lr(step))
    runtime.optimizer.zero_grad(set_to_none=True)
    loss = runtime.runner.train_step(inputs.to(runtime.device), targets.to(runtime.device))
    grad_norm = clip_grad_norm(runtime.model.parameters(), runtime.stage.cfg.train.grad_clip, runtime.pp_group)
    if math.isfinite(float(grad_norm)):
        runtime.optimizer.step()
    synchronize(runtime.device)
    return float(loss)


def free_device_memory(device: torch.device) -> None:
    """Drop what the previous row left (compiled graphs, cached blocks) so rows do not see each other."""
    gc.collect()
    torch.compiler.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def train_row(overrides: list[str], rt: Runtime, meshes: MeshCache, vocab_size: int, warmup: int, steps: int
              ) -> dict:
    """Build the stage from `overrides` and time `steps` optimizer steps after `warmup` ones."""
    cfg = load_config(BASE_CONFIG, overrides)
    validate(cfg, rt.world_size)
    plan = build_stage_plan(cfg, vocab_size, rt.device.type)
    stage = plan.stages[0]
    started = time.perf_counter()
    runtime = build_stage_runtime(plan, stage, rt, meshes, lambda message: None)
    build_s = time.perf_counter() - started
    try:
        losses, times = [], []
        for step in range(1, warmup + steps + 1):
            started = time.perf_counter()
            losses.append(optimizer_step(runtime, plan, step))
            times.append(time.perf_counter() - started)
    finally:
        runtime.close()
    step_s = statistics.median(times[warmup:])
    return {"params": count_parameters(stage.shape), "active_matmul_params": matmul_params(stage.shape),
            "expert_kernel": stage.shape.moe.expert_kernel if stage.shape.moe else None,
            "tokens_per_step": stage.tokens_per_step, "flops_per_step": stage.flops_per_step,
            "build_s": build_s, "first_step_s": times[0], "step_s": step_s, "step_s_timed": times[warmup:],
            "tokens_per_s": stage.tokens_per_step / step_s, "achieved_flops": stage.flops_per_step / step_s,
            "peak_memory_gib": peak_memory_gib(rt.device), "loss_first": losses[0], "loss_last": losses[-1]}


def with_mfu(row: dict, measured_peak: float, datasheet_peak: float | None, goal: float) -> dict:
    """Add MFU against both peaks and the goal verdict (against the data sheet, else the measured peak)."""
    row["mfu_measured_peak"] = row["achieved_flops"] / measured_peak
    row["mfu_datasheet_peak"] = row["achieved_flops"] / datasheet_peak if datasheet_peak else None
    judged = row["mfu_datasheet_peak"] if datasheet_peak else row["mfu_measured_peak"]
    row["goal_mfu"], row["meets_goal"] = goal, judged >= goal
    return row


def fit_micro_batch(run: Callable[[int], dict], micro_batch: int, device: torch.device) -> dict:
    """`run(micro_batch)`, halving the micro-batch after each out-of-memory error down to 1 (the tokens per
    step stay the same: more micro-batches are accumulated). The row says which micro-batch it ran and
    which ran out of memory; the last error propagates when even 1 does not fit."""
    too_large = []
    while True:
        try:
            return {**run(micro_batch), "micro_batch": micro_batch, "micro_batches_out_of_memory": too_large}
        except torch.cuda.OutOfMemoryError:
            if micro_batch == 1:
                raise
            too_large.append(micro_batch)
            micro_batch //= 2
            free_device_memory(device)


@dataclass(frozen=True)
class RowContext:
    """What every training row shares: sizes, the process, its meshes, the dataset, the peaks."""

    scale: Scale
    smoke: bool
    rt: Runtime
    meshes: MeshCache
    dataset_dir: Path
    run_dir: Path
    warmup: int
    steps: int
    measured_peak: float
    datasheet_peak: float | None


def training_row(model: str, variant: str, ctx: RowContext) -> dict:
    """One (model, variant) row in its own build; a failure (out of memory at micro-batch 1 included) is
    recorded as the row's status rather than raised."""
    def run(micro_batch: int) -> dict:
        overrides = row_overrides(model, variant, ctx.scale, ctx.smoke, ctx.dataset_dir, ctx.run_dir, micro_batch)
        return {"overrides": overrides,
                **train_row(overrides, ctx.rt, ctx.meshes, ctx.scale.vocab_size, ctx.warmup, ctx.steps)}

    head = {"model": model, "variant": variant}
    print(f"  training {model} / {variant} ...", file=sys.stderr, flush=True)
    free_device_memory(ctx.rt.device)
    goal = GOALS["moe_mfu"] if "moe" in model else GOALS["dense_mfu"]
    try:
        row = fit_micro_batch(run, ctx.scale.micro_batch[model], ctx.rt.device)
        return {**head, "status": "ok", **with_mfu(row, ctx.measured_peak, ctx.datasheet_peak, goal)}
    except torch.cuda.OutOfMemoryError as e:
        return {**head, "status": "oom", "error": str(e).splitlines()[0]}
    except Exception as e:  # one broken variant must not hide the others' numbers
        return {**head, "status": "error", "error": f"{type(e).__name__}: {e}"[:2000]}


def training_rows(models: list[str], variants: list[str], scale: Scale, smoke: bool, rt: Runtime, warmup: int,
                  steps: int, measured_peak: float, datasheet_peak: float | None) -> list[dict]:
    """Every (model, variant) row (expert-kernel variants for the MoE model only), on one synthetic dataset."""
    with tempfile.TemporaryDirectory(prefix="gpu_step_") as tmp:
        tokens = 2 * scale.global_batch * scale.seq_len + 1
        dataset = write_synthetic_dataset(Path(tmp) / "data", scale.vocab_size, tokens)
        ctx = RowContext(scale, smoke, rt, MeshCache(rt.world_size, rt.device.type), dataset, Path(tmp) / "run",
                         warmup, steps, measured_peak, datasheet_peak)
        rows = [training_row(model, variant, ctx) for model in models for variant in variants
                if "moe" in model or not VARIANTS[variant][1]]
    free_device_memory(rt.device)
    return rows


# ----------------------------------------------------------------------------- section 2: MoE block split


def moe_pieces(moe: MoEFeedForward, x: torch.Tensor, gy: torch.Tensor,
               autocast: Callable[[], contextlib.AbstractContextManager]) -> dict[str, Callable[[], None]]:
    """Forward (under `autocast`) + backward of each piece of `moe` on its own, fed the real output of the
    piece before. x, gy: [T, d_model] tokens and the gradient arriving at the block's output."""
    num_tokens, k = x.shape[0], moe.router.top_k
    with torch.no_grad(), autocast():
        routing = moe.router(x)
        token_index, slot, counts = sort_by_expert(routing.expert_ids, routing.keep, 0, moe.experts.num_experts)
        gate = routing.weights.flatten()[slot]
        sorted_x = x[token_index]
        expert_out = moe.experts(sorted_x, counts)
    g_weights = torch.randn(num_tokens, k, device=x.device)
    g_experts = torch.randn_like(expert_out)

    def leaf(t: torch.Tensor) -> torch.Tensor:
        return t.detach().requires_grad_()

    def router():
        with autocast():
            r = moe.router(leaf(x))
            loss = (r.weights * g_weights).sum() + r.aux_loss + r.z_loss
        loss.backward()

    def permute():
        xx = leaf(x)
        with autocast():
            index, _, _ = sort_by_expert(routing.expert_ids, routing.keep, 0, moe.experts.num_experts)
            gathered = xx[index]
        gathered.backward(sorted_x)

    def experts():
        with autocast():
            y = moe.experts(leaf(sorted_x), counts)
        y.backward(g_experts)

    def combine_back():
        with autocast():
            y = combine(leaf(expert_out), token_index, leaf(gate), num_tokens)
        y.backward(gy.to(y.dtype))

    return {"router": router, "permute": permute, "experts": experts, "combine": combine_back}


def moe_block_row(kernel: str, d_model: int, num_experts: int, top_k: int, expert_hidden: int, tokens: int,
                  device: torch.device, autocast: Callable[[], contextlib.AbstractContextManager], iters: int) -> dict:
    """Milliseconds (median) of the MoE block, its pieces and the dense SwiGLU of the same active
    parameters, forward (under `autocast`) + backward on [tokens, d_model] fp32 inputs (the residual
    stream's dtype)."""
    torch.manual_seed(0)
    shape = MoEShape(num_experts=num_experts, top_k=top_k, expert_hidden=expert_hidden, expert_kernel=kernel)
    moe = MoEFeedForward(d_model, shape, LOCAL_EXPERTS).to(device)
    moe.experts.init_weights(d_model ** -0.5, expert_hidden ** -0.5)
    dense = SwiGLU(d_model, top_k * expert_hidden).to(device)
    x = torch.randn(tokens, d_model, device=device)
    gy = torch.randn(tokens, d_model, device=device)

    def fwd_bwd(module: torch.nn.Module) -> Callable[[], None]:
        def run():
            with autocast():
                y = module(x.detach().requires_grad_())
            y.backward(gy.to(y.dtype))
        return run

    def ms(fn: Callable[[], None]) -> float:
        return 1e3 * statistics.median(time_calls(fn, device, warmup=2, iters=iters))

    split = {name: ms(fn) for name, fn in moe_pieces(moe, x, gy, autocast).items()}
    block, dense_ms = ms(fwd_bwd(moe)), ms(fwd_bwd(dense))
    return {"expert_kernel": kernel, "tokens": tokens, "pieces_ms": split, "sum_of_pieces_ms": sum(split.values()),
            "moe_block_ms": block, "dense_ffn_ms": dense_ms, "ratio": block / dense_ms,
            "goal_ratio": GOALS["moe_block_over_dense_ffn"],
            "meets_goal": block / dense_ms <= GOALS["moe_block_over_dense_ffn"]}


def moe_block_rows(scale: Scale, smoke: bool, device: torch.device, autocast) -> list[dict]:
    """One row per expert kernel at the MoE model's shape and micro-batch."""
    cfg = load_config(BASE_CONFIG, MODELS["moe_350m_16e"] + (SMOKE_SHAPES["moe_350m_16e"] if smoke else []))
    m, tokens = cfg.moe, scale.micro_batch["moe_350m_16e"] * scale.seq_len
    rows = []
    for kernel in EXPERT_KERNELS:
        print(f"  moe block / {kernel} ...", file=sys.stderr, flush=True)
        free_device_memory(device)
        try:
            rows.append({"status": "ok", **moe_block_row(kernel, cfg.model.d_model, m.num_experts, m.top_k,
                                                         m.expert_hidden, tokens, device, autocast,
                                                         scale.block_iters)})
        except Exception as e:  # e.g. a kernel this device or dtype does not support
            rows.append({"status": "error", "expert_kernel": kernel, "error": f"{type(e).__name__}: {e}"[:2000]})
    return rows


# ----------------------------------------------------------------------------- section 3: patch loss


def patch_loss_comparison(scale: Scale, device: torch.device, iters: int) -> dict:
    """Forward + backward ms (median) of the triton next-patch loss against the torch reference on
    logits [micro_batch * seq_len, vocab] (bf16 on GPU, fp32 in --smoke) and targets [rows, K]."""
    if not TRITON_AVAILABLE:
        return {"status": "unavailable", "error": "triton is not installed"}
    if device.type != "cuda":
        os.environ["TRITON_INTERPRET"] = "1"  # the kernels jit lazily, so this still takes effect
    rows = scale.micro_batch["dense_350m"] * scale.seq_len
    dtype = torch.bfloat16 if scale.dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    logits = torch.randn(rows, scale.vocab_size, device=device, dtype=dtype)
    targets = torch.randint(0, scale.vocab_size, (rows, scale.patch_targets), device=device)

    def loss_and_grad(fn):
        leaf = logits.detach().requires_grad_()
        loss = fn(leaf, targets)
        loss.backward()
        return loss.detach(), leaf.grad

    (ref_loss, ref_grad), (tri_loss, tri_grad) = loss_and_grad(patch_cross_entropy), \
        loss_and_grad(triton_patch_cross_entropy)
    timed = {name: 1e3 * statistics.median(time_calls(lambda: loss_and_grad(fn), device, warmup=2, iters=iters))
             for name, fn in (("torch", patch_cross_entropy), ("triton", triton_patch_cross_entropy))}
    speedup = timed["torch"] / timed["triton"]
    return {"status": "ok", "rows": rows, "vocab": scale.vocab_size, "targets_per_row": scale.patch_targets,
            "dtype": str(dtype).removeprefix("torch."), "torch_ms": timed["torch"], "triton_ms": timed["triton"],
            "speedup": speedup, "interpreted": device.type != "cuda",
            "loss_abs_diff": float((ref_loss - tri_loss).abs()),
            "grad_max_abs_diff": float((ref_grad.float() - tri_grad.float()).abs().max()),
            "goal_speedup": GOALS["patch_kernel_speedup"], "meets_goal": speedup > GOALS["patch_kernel_speedup"]}


# ----------------------------------------------------------------------------- report


def percent(value: float | None) -> str:
    return "unknown" if value is None else f"{100 * value:.1f}%"


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISS"


def training_table(rows: list[dict]) -> str:
    lines = [f"{'model':<14} {'variant':<18} {'mb':>3} {'tokens/s':>10} {'step ms':>9} {'TFLOP/s':>8} {'MFU meas':>9} "
             f"{'MFU sheet':>9} {'mem GiB':>8}  goal"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['model']:<14} {r['variant']:<18} {r['status']}: {r['error'].splitlines()[0][:100]}")
            continue
        lines.append(f"{r['model']:<14} {r['variant']:<18} {r['micro_batch']:>3} {r['tokens_per_s']:>10,.0f} {1e3 * r['step_s']:>9.1f} "
                     f"{r['achieved_flops'] / 1e12:>8.1f} {percent(r['mfu_measured_peak']):>9} "
                     f"{percent(r['mfu_datasheet_peak']):>9} {r['peak_memory_gib']:>8.2f}  "
                     f">= {r['goal_mfu']:.0%} {verdict(r['meets_goal'])}")
    return "\n".join(lines)


def moe_block_table(rows: list[dict]) -> str:
    names = ("router", "permute", "experts", "combine")
    lines = [f"{'kernel':<11} " + " ".join(f"{n + ' ms':>10}" for n in names)
             + f" {'sum ms':>8} {'block ms':>9} {'dense ms':>9} {'ratio':>6}  goal"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['expert_kernel']:<11} {r['status']}: {r['error'].splitlines()[0][:100]}")
            continue
        lines.append(f"{r['expert_kernel']:<11} " + " ".join(f"{r['pieces_ms'][n]:>10.2f}" for n in names)
                     + f" {r['sum_of_pieces_ms']:>8.2f} {r['moe_block_ms']:>9.2f} {r['dense_ffn_ms']:>9.2f} "
                     f"{r['ratio']:>5.2f}x  <= {r['goal_ratio']}x {verdict(r['meets_goal'])}")
    return "\n".join(lines)


def patch_line(p: dict) -> str:
    if p["status"] != "ok":
        return f"patch loss: {p['status']}: {p['error']}"
    return (f"patch loss [{p['rows']} x {p['vocab']}] {p['dtype']}, K={p['targets_per_row']}: torch {p['torch_ms']:.2f} ms, "
            f"triton {p['triton_ms']:.2f} ms{' (interpreted)' if p['interpreted'] else ''}, speedup "
            f"{p['speedup']:.2f}x (goal > {p['goal_speedup']:.0f}x: {verdict(p['meets_goal'])}); |loss diff| "
            f"{p['loss_abs_diff']:.2e}, max |grad diff| {p['grad_max_abs_diff']:.2e}")


def print_report(result: dict) -> None:
    peak = result["peak"]
    print(f"device: {result['device']} | measured matmul peak {peak['measured_flops'] / 1e12:.1f} TFLOP/s "
          f"({peak['dtype']}, [{peak['matmul_n']}]^2) | data-sheet peak "
          + (f"{peak['datasheet_flops'] / 1e12:.0f} TFLOP/s" if peak["datasheet_flops"] else "unknown"))
    print(f"\n[training] {result['scale']['dtype']}, seq {result['scale']['seq_len']}, global batch "
          f"{result['scale']['global_batch']} (goals: dense MFU >= {GOALS['dense_mfu']:.0%}, MoE >= "
          f"{GOALS['moe_mfu']:.0%}, against the data-sheet peak when known)")
    print(training_table(result["training"]))
    print(f"\n[MoE block vs dense SwiGLU of the same active parameters, forward + backward] "
          f"(goal: <= {GOALS['moe_block_over_dense_ffn']}x)")
    print(moe_block_table(result["moe_block"]))
    print("\n" + patch_line(result["patch_loss"]))


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, fp32, a couple of steps (for CI)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS),
                   help="default: all (with --smoke all but compile, which would spend the CI budget compiling)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per row (default 3; --smoke 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row (default 10; --smoke 2)")
    p.add_argument("--skip", nargs="*", default=[], choices=["training", "moe_block", "patch_loss"])
    p.add_argument("--out", default=None, help="default runs/bench/gpu_step.json (--smoke: gpu_step_smoke.json)")
    args = p.parse_args(argv)
    if args.variants is None:
        args.variants = [v for v in VARIANTS if not (args.smoke and v == "compile")]
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 3)
    args.steps = args.steps if args.steps is not None else (2 if args.smoke else 10)
    args.out = args.out or str(REPO / f"runs/bench/gpu_step{'_smoke' if args.smoke else ''}.json")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print(NEEDS_GPU, file=sys.stderr)
        return 2
    torch.manual_seed(0)
    scale = SMOKE_SCALE if args.smoke else GPU_SCALE
    rt = init_distributed()  # one process: the same Runtime `ppmoe train` gets (cuda:0, or the CPU)
    device = rt.device
    matmul_dtype = torch.bfloat16 if scale.dtype == "bf16" else torch.float32
    measured = measure_matmul_peak(device, matmul_dtype, scale.matmul_n, scale.matmul_iters)
    datasheet = peak_flops_per_device(None)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if scale.dtype == "bf16" \
        else contextlib.nullcontext
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "smoke": args.smoke, "args": vars(args), "scale": vars(scale),
              "goals": GOALS, "peak": {"measured_flops": measured, "datasheet_flops": datasheet,
                                       "dtype": str(matmul_dtype).removeprefix("torch."),
                                       "matmul_n": scale.matmul_n}}
    try:
        result["training"] = [] if "training" in args.skip else training_rows(
            args.models, args.variants, scale, args.smoke, rt, args.warmup, args.steps, measured, datasheet)
        result["moe_block"] = [] if "moe_block" in args.skip else moe_block_rows(scale, args.smoke, device, autocast)
        result["patch_loss"] = {"status": "skipped", "error": "--skip patch_loss"} if "patch_loss" in args.skip \
            else patch_loss_comparison(scale, device, scale.block_iters)
    finally:
        shutdown()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print_report(result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
