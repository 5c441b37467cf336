"""How much accelerator memory one rank needs for a stage, estimated before anything is allocated, and
printed once at start-up (Trainer.log_start).

Parameters, gradients and optimizer state are counted parameter by parameter on the meta model with
the rules the parallel code applies (exact for the parameters: tested against the built model):
- pipeline: a rank keeps the layers of its stages (ppmoe.parallel.pipeline), the embedding on the first
  stage, the final norm and the head on the last;
- tensor parallel: the split dimension of every weight the TP plan shards (ppmoe.parallel.tensor_parallel)
  is divided by tp; norms and the router gate are replicated;
- experts: whole experts over the TP group (experts_in_tp) or over the data-parallel group (alltoall,
  then owned by one rank and left alone by data parallelism), or all of them (local);
- FSDP: dim 0 of every other (TP-local) tensor in torch.chunk pieces over dp (uneven: rank 0 the larger);
  DDP replicates.
Bytes: the parameters are fp32 master weights (4 B), their gradients fp32 (4 B), AdamW's two moments fp32
(8 B). While micro-batches accumulate without a reduction, FSDP keeps the unsharded (TP-local) gradients
in the reduce dtype until the last micro-batch reduces them: then the gradient term is that, not the
shard. Working copies: the unsharded compute-dtype parameters the wrapper gathers (two blocks and the
root's under FSDP; the whole stage under FSDP with pipelining, whose schedule keeps them for the step;
the whole model under DDP with bf16).

Activations: Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models")
count sbh(34 + 5as/h) bytes per layer in 16-bit for GPT (LayerNorm, 4h GeLU MLP, dropout, unfused
attention): s sequence, b micro-batch, h d_model, a heads; sbh(10 + 24/t + 5as/(ht)) with TP over t,
sbh(34 + 5as/h)/t with TP + SP, 34sbh/t with selective recompute of the attention core, 2sbh (the
layer's input) with full recompute. Adapted here to what autograd saves in this model, p bytes per
element (2 bf16, 4 fp32), per token of a micro-batch (T = s b tokens), r = n_kv_heads / n_heads, f the
FFN hidden size, c = 1/t with sequence parallelism (the residual stream and the norms' inputs are
sharded) and 1 without:
  attention   p h (c + 1 + (3 + 2r)/t) + 4a/t: the norm's input, the gathered q/k/v input, q, k, v,
              the attention output and the output projection's input; no dropout, and SDPA's fused
              kernels keep the fp32 log-sum-exp (4a/t) instead of the 5as^2 b softmax and masks (the
              `5as/h` term disappears);
  SwiGLU      p (h (c + 1) + 4f/t): norm input, w1/w3 input, w1 x, silu(w1 x), w3 x, their product;
  MoE         p h c + 4h + 12E (norm input, the router's fp32 input copy, logits/probabilities) plus per
              assignment k_r (k/t under experts_in_tp, else k) p (2h + 4 f_e) + 12 (expert input and
              output, the expert SwiGLU's four, the gate weight and index), plus a shared expert's
              p (h + 4 f_s / t);
  head        p h (c + 1) + (8 + p) V/t on the last stage: the fp32 log-softmax, its fp32 gradient and the
              logits' gradient at the loss's backward;
  selective   (ac_every 0, per op) the block input and the matmul and attention outputs are kept, the
              norms, RoPE, SiLU and products recomputed: p h c + p (2h + (2 + 2r) h/t) + 4a/t for
              attention, p (2 f/t + h) for SwiGLU, 4E + k_r p (2 f_e + h) for MoE;
              (ac_every n) every n-th block (0, n, 2n, ...) fully recomputed, the others kept;
  full        p h c per layer (its input);
and under recomputation one layer's recomputed activations at a time on top (its backward).
Micro-batches in flight on pipeline rank r of p with m micro-batches: 1 without pipelining, m for
GPipe, min(m, p - r) for 1F1B (up to pp on the first stage), the warm-up chunks / v for the interleaved
schedules ((v - 1) p + 2 (p - 1 - r) + 1 chunks of 1/v of the rank's layers), min(m, p) for ZBV and
min(m, p + 1) for DualPipeV (V shapes: about the 1F1B first stage's on every rank).
Not counted: the CUDA context and NCCL buffers (~1-2 GiB per GPU), the allocator's fragmentation,
temporary buffers of single kernels, and compile's workspaces.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from ..config import (BatchLayout, ExperimentConfig, ParallelDims, compute_dtype, reduction_dtype, resolve_layout,
                      validate)
from ..model.build import count_parameters, meta_model
from ..model.gpt import GPTShape
from ..moe.layout import SPLIT_LAYOUTS
from ..parallel.pipeline import layers_per_stage, stage_ids
from ..parallel.tensor_parallel import block_plan
from .plan import StagePlan, build_stage_plan

GIB = 2 ** 30
MIB = 2 ** 20
BYTES = {"fp32": 4, "bf16": 2}
# The two weights apply_tensor_parallel shards at the model's root: vocabulary rows, both.
ROOT_TP_DIMS = {"tok_embeddings.weight": 0, "output.weight": 0}
EXPERT_WEIGHTS = ("experts.w1", "experts.w2", "experts.w3")
AC_NAMES = {"none": "no AC", "selective": "selective AC", "full": "full AC"}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on one rank (`pp_rank`: its pipeline rank)."""

    params: int
    grads: int
    optimizer: int
    working_copies: int
    activations: int
    pp_rank: int = 0

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.working_copies + self.activations

    def describe(self, activation_checkpointing: str, device_total: int | None = None) -> str:
        """'params 1.2 GiB, grads 1.2, optimizer 2.4, working copies 0.1, activations 5.3 (selective AC) =
        10.2 GiB of 80 GiB', in MiB when the total is below 1 GiB (small runs)."""
        unit, size = ("GiB", GIB) if self.total >= GIB else ("MiB", MIB)

        def amount(n: int) -> str:
            return f"{n / size:.1f}"
        line = (f"params {amount(self.params)} {unit}, grads {amount(self.grads)}, optimizer "
                f"{amount(self.optimizer)}, working copies {amount(self.working_copies)}, activations "
                f"{amount(self.activations)} ({AC_NAMES[activation_checkpointing]}) = {amount(self.total)} {unit}")
        if device_total:
            line += f" of {device_total / GIB:.0f} GiB"
            if self.total > device_total:
                line += (": does not fit (recompute more with train.activation_checkpointing, lower "
                         "train.micro_batch_size, or add tp / pp / FSDP dp)")
        return line


def chunk_size(n: int, pieces: int, index: int) -> int:
    """Rows of piece `index` when torch.chunk splits n rows into `pieces` (how FSDP2 and Shard(0) split)."""
    size = math.ceil(n / pieces)
    return max(0, min(size, n - index * size))


@dataclass(frozen=True)
class ParameterTable:
    """The whole model's parameters ({name: shape}, a tied embedding once) and {name: the dimension tensor
    parallelism splits}, from the plan tensor_parallel.py applies (Linear weights are [out, in]:
    column-parallel splits dim 0, row-parallel dim 1; other styles keep their weights whole)."""

    shapes: dict[str, tuple[int, ...]]
    tp_dims: dict[str, int]


@functools.lru_cache(maxsize=8)
def parameter_table(shape: GPTShape) -> ParameterTable:
    model = meta_model(shape)
    tp_dims = dict(ROOT_TP_DIMS)
    for index, layer in model.layers.items():
        for path, style in block_plan(layer.feed_forward).items():
            if isinstance(style, (ColwiseParallel, RowwiseParallel)):
                tp_dims[f"layers.{index}.{path}.weight"] = 0 if isinstance(style, ColwiseParallel) else 1
    return ParameterTable({name: tuple(p.shape) for name, p in model.named_parameters()}, tp_dims)


def stage_parameter_names(shape: GPTShape, dims: ParallelDims, cfg: ExperimentConfig, pp_rank: int) -> set[str]:
    """The parameters pipeline rank `pp_rank` holds: its stages' layers, the ends' embedding / norm + head
    (with tied embeddings the last stage's head is a copy of the embedding, counted under its name)."""
    names = set(parameter_table(shape).shapes)
    if dims.pp == 1:
        return names
    par = cfg.parallel
    num_stages = dims.pp * par.pp_virtual_stages
    counts = layers_per_stage(shape.n_layers, num_stages, par.pp_layers)
    ids = stage_ids(pp_rank, par)
    layers = {str(i) for s in ids for i in range(sum(counts[:s]), sum(counts[:s + 1]))}
    kept = set()
    for name in names:
        part = name.split(".")
        if part[0] == "layers" and part[1] in layers:
            kept.add(name)
        elif part[0] == "tok_embeddings" and (0 in ids or shape.tie_embeddings and num_stages - 1 in ids):
            kept.add(name)  # a tied head's rank holds its own copy of the embedding
        elif part[0] in ("norm", "output") and num_stages - 1 in ids:
            kept.add(name)
    return kept


@dataclass(frozen=True)
class LocalParameters:
    """Elements on this rank: `sharded` what it stores (fp32 master weights), `unsharded` the TP-local
    full tensors of what data parallelism manages (what FSDP gathers), `owned` the experts a layout
    gives to this data-parallel rank alone; `largest_blocks` (the two largest blocks) and `root` (embedding,
    final norm, head), unsharded, for the working copies."""

    sharded: int
    unsharded: int
    owned: int
    largest_blocks: int
    root: int


def local_parameters(shape: GPTShape, cfg: ExperimentConfig, dims: ParallelDims, pp_rank: int = 0,
                     dp_rank: int = 0) -> LocalParameters:
    """This rank's parameter elements (see the module docstring for the rules)."""
    table = parameter_table(shape)
    tp_dims = table.tp_dims if dims.tp > 1 else {}
    expert_dim = SPLIT_LAYOUTS.get(cfg.moe.dispatcher, ("", None))[0]
    experts_over = {"tp": dims.tp, "dp": dims.dp}.get(expert_dim, 1)
    fsdp = cfg.parallel.dp_type == "fsdp"
    kept = stage_parameter_names(shape, dims, cfg, pp_rank)
    sharded = unsharded = owned = root = 0
    blocks: dict[str, int] = {}
    for name, param_shape in table.shapes.items():
        if name not in kept:
            continue
        size = list(param_shape)
        if name.endswith(EXPERT_WEIGHTS) and experts_over > 1:
            size[0] //= experts_over  # whole experts per rank (num_experts divides: a config rule)
            if expert_dim == "dp":  # owned by this data-parallel rank: not sharded or reduced by DP
                n = math.prod(size)
                sharded, owned = sharded + n, owned + n
                continue
        elif name in tp_dims:
            size[tp_dims[name]] //= dims.tp
        full = math.prod(size)
        rows = chunk_size(size[0], dims.dp, dp_rank) if fsdp else size[0]
        sharded += full // size[0] * rows if size[0] else 0
        unsharded += full
        if name.startswith("layers."):
            block = name.split(".")[1]
            blocks[block] = blocks.get(block, 0) + full
        else:
            root += full
    largest = sum(sorted(blocks.values(), reverse=True)[:2])
    return LocalParameters(sharded, unsharded, owned, largest, root)


def micro_batches_in_flight(cfg: ExperimentConfig, dims: ParallelDims, batch: BatchLayout, pp_rank: int) -> float:
    """Micro-batches whose activations pipeline rank `pp_rank` holds at its peak, in units of one
    micro-batch through all of the rank's layers (the module docstring has the schedules' counts)."""
    p, m, r = dims.pp, batch.micro_batches, pp_rank
    if p == 1:
        return 1
    schedule, v = cfg.parallel.pp_schedule, cfg.parallel.pp_virtual_stages
    if schedule == "gpipe":
        return m
    if schedule in ("interleaved_1f1b", "interleaved_zb"):
        return min(m * v, (v - 1) * p + 2 * (p - 1 - r) + 1) / v
    if schedule == "zbv":
        return min(m, p)
    if schedule == "dualpipev":
        return min(m, p + 1)
    return min(m, p - r)


@dataclass(frozen=True)
class LayerActivations:
    """Bytes per token of one layer's saved activations under each recomputation mode, and what its
    backward re-materialises on top when it is recomputed."""

    none: float
    per_op: float
    full: float

    @property
    def recomputed_per_op(self) -> float:
        return self.none - self.per_op


def layer_activations(shape: GPTShape, index: int, cfg: ExperimentConfig, tp: int, p: int) -> LayerActivations:
    """Layer `index`'s activation bytes per token (formulas in the module docstring)."""
    h, t = shape.d_model, tp
    r, a = shape.n_kv_heads / shape.n_heads, shape.n_heads
    c = 1 / t if cfg.parallel.sequence_parallel and t > 1 else 1
    attention = p * h * (c + 1 + (3 + 2 * r) / t) + 4 * a / t
    attention_kept = p * h * c + p * (2 * h + (2 + 2 * r) * h / t) + 4 * a / t
    if shape.is_moe_layer(index):
        moe = shape.moe
        k = moe.top_k / t if cfg.moe.dispatcher == "experts_in_tp" and t > 1 else moe.top_k
        e, fe, fs = moe.num_experts, moe.expert_hidden, moe.shared_expert_hidden
        ffn = p * h * c + 4 * h + 12 * e + k * (p * (2 * h + 4 * fe) + 12)
        ffn_kept = 4 * e + k * p * (2 * fe + h)
        if fs:
            ffn += p * (h + 4 * fs / t)
            ffn_kept += p * (2 * fs / t + h)
    else:
        f = shape.ffn_hidden
        ffn = p * (h * (c + 1) + 4 * f / t)
        ffn_kept = p * (2 * f / t + h)
    return LayerActivations(none=attention + ffn, per_op=attention_kept + ffn_kept, full=p * h * c)


def activation_bytes(shape: GPTShape, cfg: ExperimentConfig, dims: ParallelDims, batch: BatchLayout,
                     device_type: str, pp_rank: int = 0) -> int:
    """Peak activation bytes of pipeline rank `pp_rank` under train.activation_checkpointing."""
    t = cfg.train
    p = BYTES[compute_dtype(t.dtype, device_type)]
    names = stage_parameter_names(shape, dims, cfg, pp_rank)
    layers = sorted({int(n.split(".")[1]) for n in names if n.startswith("layers.")})
    per_layer = [layer_activations(shape, i, cfg, dims.tp, p) for i in layers]
    mode = t.activation_checkpointing
    if mode == "none":
        kept, remat = sum(x.none for x in per_layer), 0.0
    elif mode == "full":
        kept, remat = sum(x.full for x in per_layer), max((x.none for x in per_layer), default=0.0)
    elif t.ac_every:  # every ac_every-th block of the stage (0, n, 2n, ...) recomputed whole
        kept = sum(x.full if j % t.ac_every == 0 else x.none for j, x in enumerate(per_layer))
        remat = max((x.none for x in per_layer), default=0.0)
    else:
        kept, remat = sum(x.per_op for x in per_layer), max((x.recomputed_per_op for x in per_layer), default=0.0)
    if "norm.weight" in names:  # the final norm: the last stage, with the head and the loss
        c = 1 / dims.tp if cfg.parallel.sequence_parallel and dims.tp > 1 else 1
        kept += p * shape.d_model * (c + 1) + (8 + p) * shape.vocab_size / dims.tp
    tokens = batch.micro_batch * shape.max_seq_len
    return int(tokens * (kept * micro_batches_in_flight(cfg, dims, batch, pp_rank) + remat))


def estimate_memory(shape: GPTShape, cfg: ExperimentConfig, dims: ParallelDims, batch: BatchLayout,
                    device_type: str, pp_rank: int = 0, dp_rank: int = 0) -> MemoryEstimate:
    """The estimate for the rank at (pp_rank, dp_rank) of a stage of shape `shape` and config `cfg` (the
    tensor-parallel rank does not matter: TP splits evenly)."""
    t, par = cfg.train, cfg.parallel
    compute = compute_dtype(t.dtype, device_type)
    reduce_bytes = BYTES[reduction_dtype(t.dtype, t.reduce_dtype, device_type)]
    local = local_parameters(shape, cfg, dims, pp_rank, dp_rank)
    wrapped = dims.dp > 1 or compute == "bf16"  # ppmoe.parallel.data_parallel.apply_data_parallel
    accumulating = wrapped and par.dp_type == "fsdp" and batch.micro_batches > 1
    grads = (local.unsharded * reduce_bytes + local.owned * 4) if accumulating else local.sharded * 4
    if not wrapped or (par.dp_type == "ddp" and compute == "fp32"):
        copies = 0
    elif par.dp_type == "ddp" or dims.pp > 1:
        copies = local.unsharded * BYTES[compute]
    else:
        copies = (local.largest_blocks + local.root) * BYTES[compute]
    return MemoryEstimate(params=local.sharded * 4, grads=grads, optimizer=local.sharded * 8, working_copies=copies,
                          activations=activation_bytes(shape, cfg, dims, batch, device_type, pp_rank),
                          pp_rank=pp_rank)


def largest_estimate(shape: GPTShape, cfg: ExperimentConfig, dims: ParallelDims, batch: BatchLayout,
                     device_type: str) -> MemoryEstimate:
    """The rank that needs the most: over the pipeline ranks, at data-parallel rank 0 (the larger FSDP
    pieces)."""
    return max((estimate_memory(shape, cfg, dims, batch, device_type, pp_rank=r) for r in range(dims.pp)),
               key=lambda e: e.total)


def device_memory(device: torch.device) -> int | None:
    """The accelerator's total memory in bytes; None on CPU (host memory is not what runs out)."""
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None


def memory_report(plan: StagePlan, world_size: int, device_type: str, device_total: int | None = None) -> list[str]:
    """One line per stage shape (stages that would print the same line print it once); `device_total`: the
    bytes of one accelerator, when known (then the line says whether the estimate fits)."""
    lines, seen = [], set()
    for stage in plan.stages:
        dims, batch = resolve_layout(stage.cfg, world_size)
        estimate = largest_estimate(stage.shape, stage.cfg, dims, batch, device_type)
        where = f" (pipeline rank {estimate.pp_rank}, the largest)" if dims.pp > 1 else ""
        body = f"memory estimate per rank{where}: " + estimate.describe(stage.cfg.train.activation_checkpointing,
                                                                       device_total)
        if body not in seen:
            seen.add(body)
            lines.append(f"stage {stage.name}: {body}" if len(plan.stages) > 1 else body)
    return lines


def config_report(cfg: ExperimentConfig, world_size: int, device_total: int | None) -> list[str]:
    """`ppmoe estimate`: the estimate of a config on `world_size` GPUs, before any data or GPU exists
    (model.vocab_size, else data.vocab_size, stands for the prepared dataset's vocabulary)."""
    validate(cfg, world_size)
    dims, _ = resolve_layout(cfg, world_size)
    plan = build_stage_plan(cfg, cfg.model.vocab_size or cfg.data.vocab_size, "cuda")
    precision = compute_dtype(cfg.train.dtype, "cuda")
    head = (f"world {world_size} = tp {dims.tp} x pp {dims.pp} x dp {dims.dp} ({cfg.parallel.dp_type}), "
            f"{precision} compute, {count_parameters(plan.stages[-1].shape):,} parameters")
    return [head, *memory_report(plan, world_size, "cuda", device_total)]
