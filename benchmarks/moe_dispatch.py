"""MoE dispatch side by side: dense TP FFN vs Pipeline-MoE vs all-to-all EP (ours) vs DeepSpeed-MoE.

    OMP_NUM_THREADS=1 python benchmarks/moe_dispatch.py [--procs 2] [--d-model 256] [--experts 8] \
        [--top-k 1] [--expert-hidden 512] [--tokens 2048] [--iters 5] [--repeats 5] [--mode block|model|both] \
        [--out runs/bench/moe_dispatch.json]

All variants run in one invocation with the same process count P, model shape and GLOBAL batch of tokens;
each is timed on P forked gloo processes (forked after `import torch`, like tests/multiproc.py), one
variant after the other (interleaved rounds, see below), forward + backward (loss = <y, g> with a fixed random g; the input requires grad,
as it would inside a model; grads set to None between steps; no optimizer):

  dense      SwiGLU with hidden = top_k * expert_hidden (the same active parameters per token as the MoE),
             Megatron tensor parallel over P ranks: column-parallel w1/w3, row-parallel w2, built from plain
             tensors and ppmoe.moe.comm.copy_to_group / reduce_from_group. Every rank sees the global batch.
  pipeline   Pipeline-MoE: ppmoe MoEFeedForward, experts DTensor-sharded (Shard(0)) over the P ranks of the
             TP group, the ExpertsInTP layout (one all-reduce forward, one backward). Every rank sees the global
             batch.
  alltoall   ppmoe MoEFeedForward with the AllToAllExperts layout over P EP ranks (ours). Each rank sees
             global / P tokens (data parallel); two all-to-alls forward, two backward (+ one tiny count
             exchange).
  deepspeed  deepspeed.moe.layer.MoE (the paper's DPMoE baseline) with ep_size=P, the same E, top-k and
             SwiGLU experts (ppmoe.layers.SwiGLU(d, expert_hidden)), DeepSpeed's default gate settings
             (capacity_factor 1.0, min_capacity 4, drop_tokens=True, RTS): token-dropping, all-to-alls padded
             to E x capacity. Each rank sees global / P tokens. Optional: if deepspeed cannot be imported or
             run, the exact error is recorded instead of numbers.

`--mode model` times forward+backward of a small model instead (n_layers pre-norm blocks: RMSNorm,
causal attention, RMSNorm, the FFN variant), where attention follows the variant's layout: Megatron TP
(heads split over P, copy/reduce around it) for dense and pipeline, data parallel (full attention on the
rank's own sequences) for alltoall and deepspeed. Gradient all-reduces of replicated parameters across data
parallel ranks (what a DP/EP training step adds once per optimizer step) are NOT part of either mode.

Reported per variant: tokens/s = global tokens per step / step time (median over `repeats` rounds of the
slowest rank's mean step time over `iters` steps after `warmup` steps; rounds are interleaved: each round
launches every variant once, so load from other processes on the shared cores hits all variants alike), and communicated bytes COUNTED, not estimated: inside each
benchmark process torch.distributed.{all_reduce, all_to_all_single, all_to_all, all_gather,
all_gather_into_tensor, reduce_scatter_tensor, broadcast, ...} are wrapped (in both torch.distributed and
torch.distributed.distributed_c10d) and sum the bytes of every call during the timed steps, per collective
type, together with the wall time spent inside them (which on gloo includes waiting for slower ranks).
Counting convention: all-reduce and broadcast = the tensor's bytes, all-to-all = the bytes this rank's input
holds (sent to all ranks, itself included), all-gather = the output's bytes, reduce-scatter = the input's
bytes. DeepSpeed's collectives go through deepspeed.comm, which calls torch.distributed.<op> at call time,
so they are counted too (the JSON shows non-zero all_to_all_single bytes for it; verified).
compute_s = (step time - time inside collectives), the slowest rank; the cost model uses it.

CAVEAT: on a 2-core CPU with gloo, "communication" is memory copies over loopback between processes
sharing two cores, and compute is single-threaded fp32 CPU matmuls. The measured tokens/s ratios say
little about GPU clusters, where compute is ~1000x faster and links differ (NVLink vs InfiniBand); use
benchmarks/cost_model.py, which takes the counted bytes and measured compute from this JSON and projects
to clusters of 8-GPU nodes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

VARIANTS = ("dense", "pipeline", "alltoall", "deepspeed")

# ----------------------------------------------------------------------------- communication counting

_COLLECTIVES = ("all_reduce", "all_to_all_single", "all_to_all", "all_gather", "all_gather_into_tensor",
                "_all_gather_base", "reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base",
                "broadcast", "reduce", "gather", "scatter", "send", "recv", "isend", "irecv")


def _nbytes(t) -> int:
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    if isinstance(t, (list, tuple)):
        return sum(_nbytes(x) for x in t)
    return 0


def _bytes_of_call(op: str, args, kwargs) -> int:
    def arg(i, name):
        return kwargs[name] if name in kwargs else (args[i] if len(args) > i else None)

    if op in ("all_reduce", "broadcast", "reduce", "send", "recv", "isend", "irecv"):
        return _nbytes(arg(0, "tensor"))
    if op == "all_to_all_single":
        return _nbytes(arg(1, "input"))
    if op == "all_to_all":
        return _nbytes(arg(1, "input_tensor_list"))
    if op in ("all_gather", "all_gather_into_tensor", "_all_gather_base"):
        return _nbytes(arg(0, "output_tensor_list" if op == "all_gather" else "output_tensor"))
    if op in ("reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base"):
        return _nbytes(arg(1, "input_list" if op == "reduce_scatter" else "input"))
    if op == "gather":
        return _nbytes(arg(0, "tensor"))
    if op == "scatter":
        return _nbytes(arg(1, "scatter_list"))
    return 0


class CommCounter:
    """Sums bytes, calls and seconds per collective while `active`."""

    def __init__(self):
        self.active = False
        self.reset()

    def reset(self):
        self.stats: dict[str, dict[str, float]] = {}

    def install(self):
        import torch.distributed.distributed_c10d as c10d

        for op in _COLLECTIVES:
            orig = getattr(c10d, op, None)
            if orig is None or getattr(orig, "_counted", False):
                continue
            wrapped = self._wrap(op, orig)
            setattr(c10d, op, wrapped)
            if hasattr(dist, op):
                setattr(dist, op, wrapped)

    def _wrap(self, op, orig):
        counter = self

        def wrapped(*args, **kwargs):
            if not counter.active:
                return orig(*args, **kwargs)
            nbytes = _bytes_of_call(op, args, kwargs)
            t0 = time.perf_counter()
            out = orig(*args, **kwargs)
            s = counter.stats.setdefault(op, {"calls": 0, "bytes": 0, "seconds": 0.0, "sizes": []})
            s["calls"] += 1
            s["bytes"] += nbytes
            s["seconds"] += time.perf_counter() - t0
            if len(s["sizes"]) < 16:
                s["sizes"].append(nbytes)
            return out

        wrapped._counted = True
        wrapped.__wrapped__ = orig
        return wrapped


COUNTER = CommCounter()

# ----------------------------------------------------------------------------- process launcher


from ppmoe.launch.local import run_ranks  # noqa: E402  (forked gloo ranks, as in the tests)


# ----------------------------------------------------------------------------- FFN variants


class DenseTPFFN(nn.Module):
    """Megatron TP SwiGLU on this rank's slice: x -> copy_to_group -> (w1, w3 columns) -> w2 rows ->
    reduce_from_group. Full weights are generated from the same seed on every rank, then sliced."""

    def __init__(self, d_model: int, hidden: int, group, rank: int, size: int, seed: int = 0):
        super().__init__()
        if hidden % size:
            raise ValueError(f"dense hidden {hidden} not divisible by P={size}")
        g = torch.Generator().manual_seed(seed)
        std = d_model ** -0.5
        w1 = torch.randn(d_model, hidden, generator=g) * std
        w3 = torch.randn(d_model, hidden, generator=g) * std
        w2 = torch.randn(hidden, d_model, generator=g) * hidden ** -0.5
        part = slice(rank * hidden // size, (rank + 1) * hidden // size)
        self.w1 = nn.Parameter(w1[:, part].contiguous())
        self.w3 = nn.Parameter(w3[:, part].contiguous())
        self.w2 = nn.Parameter(w2[part].contiguous())
        self.group = group

    def forward(self, x):
        from ppmoe.moe.comm import copy_to_group, reduce_from_group

        x = copy_to_group(x, self.group)
        partial = (F.silu(x @ self.w1) * (x @ self.w3)) @ self.w2
        return reduce_from_group(partial, self.group)


class DSWrap(nn.Module):
    """deepspeed MoE returns (output, l_aux, exp_counts); keep the output and add l_aux to the loss path."""

    def __init__(self, moe):
        super().__init__()
        self.moe = moe

    def forward(self, x):
        out, l_aux, exp_counts = self.moe(x)
        self.last_exp_counts = exp_counts.detach()
        from ppmoe.moe.aux_loss import attach_loss

        return attach_loss(out, 0.01 * l_aux)


def build_ffn(variant: str, a, group, rank: int, size: int) -> nn.Module:
    from ppmoe.moe import MoEFeedForward, MoEShape
    from ppmoe.moe.experts import resolve_kernel

    shape = MoEShape(num_experts=a.experts, top_k=a.top_k, expert_hidden=a.expert_hidden,
                     capacity_factor=None, shared_expert_hidden=0,
                     expert_kernel=resolve_kernel(a.expert_kernel, "cpu", a.d_model, a.expert_hidden))
    if variant == "dense":
        return DenseTPFFN(a.d_model, a.top_k * a.expert_hidden, group, rank, size)
    if variant in ("pipeline", "alltoall"):
        from torch.distributed.device_mesh import DeviceMesh

        from ppmoe.moe.layout import AllToAllExperts, ExpertsInTP

        mesh = DeviceMesh("cpu", list(range(size)))
        layout = (ExpertsInTP if variant == "pipeline" else AllToAllExperts)(mesh, a.experts)
        torch.manual_seed(0)
        m = MoEFeedForward(a.d_model, shape, layout)
        m.experts.init_weights(a.d_model ** -0.5, a.expert_hidden ** -0.5)
        layout.distribute(m.experts)
        return m
    if variant == "deepspeed":
        import deepspeed
        from deepspeed.moe.layer import MoE

        from ppmoe.layers import SwiGLU

        torch.manual_seed(0)
        moe = MoE(hidden_size=a.d_model, expert=SwiGLU(a.d_model, a.expert_hidden), num_experts=a.experts,
                  ep_size=size, k=a.top_k, capacity_factor=a.ds_capacity_factor,
                  eval_capacity_factor=a.ds_capacity_factor, min_capacity=4, drop_tokens=not a.ds_dropless)
        moe.set_deepspeed_parallelism()
        del deepspeed
        return DSWrap(moe)
    raise ValueError(variant)


# ----------------------------------------------------------------------------- model-step mode


class TPAttention(nn.Module):
    """Megatron TP attention: this rank's heads (n_heads / P); copy in, reduce out."""

    def __init__(self, d_model: int, n_heads: int, group, size: int):
        super().__init__()
        from ppmoe.layers import Attention

        if n_heads % size:
            raise ValueError(f"n_heads {n_heads} not divisible by P={size}")
        self.attn = Attention(d_model, n_heads, n_heads)
        hd, local = d_model // n_heads, n_heads // size
        self.attn.wq = nn.Linear(d_model, local * hd, bias=False)
        self.attn.wk = nn.Linear(d_model, local * hd, bias=False)
        self.attn.wv = nn.Linear(d_model, local * hd, bias=False)
        self.attn.wo = nn.Linear(local * hd, d_model, bias=False)
        self.group = group

    def forward(self, x, cos, sin):
        from ppmoe.moe.comm import copy_to_group, reduce_from_group

        return reduce_from_group(self.attn(copy_to_group(x, self.group), cos, sin), self.group)


class SmallModel(nn.Module):
    def __init__(self, a, variant, group, rank, size):
        super().__init__()
        from ppmoe.layers import Block, RMSNorm, rotary_tables

        blocks = []
        for _ in range(a.n_layers):
            b = Block(a.d_model, a.n_heads, a.n_heads, build_ffn(variant, a, group, rank, size), 1e-5)
            if variant in ("dense", "pipeline"):
                b.attention = TPAttention(a.d_model, a.n_heads, group, size)
            blocks.append(b)
        self.blocks = nn.ModuleList(blocks)
        self.norm = RMSNorm(a.d_model, 1e-5)
        cos, sin = rotary_tables(a.d_model // a.n_heads, a.seq_len, 10000.0)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x):
        for b in self.blocks:
            x = b(x, self.cos, self.sin)
        return self.norm(x)


# ----------------------------------------------------------------------------- worker


def worker(variant: str, a, mode: str) -> dict:
    dist.init_process_group("gloo")
    COUNTER.install()
    if variant == "deepspeed":
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD
    local_tokens = a.tokens if variant in ("dense", "pipeline") else a.tokens // size
    torch.manual_seed(1234)
    if mode == "block":
        module = build_ffn(variant, a, group, rank, size)
        shape = (1, a.tokens, a.d_model)
    else:
        module = SmallModel(a, variant, group, rank, size)
        shape = (a.tokens // a.seq_len, a.seq_len, a.d_model)
    module.train()
    # The global batch, identical on every rank; data-parallel variants take their own 1/P of it.
    g = torch.Generator().manual_seed(42)
    x_global = torch.randn(shape, generator=g)
    gy_global = torch.randn(shape, generator=g)
    if local_tokens != a.tokens:
        dim = 1 if mode == "block" else 0
        x_local, gy_local = x_global.chunk(size, dim=dim)[rank], gy_global.chunk(size, dim=dim)[rank]
    else:
        x_local, gy_local = x_global, gy_global
    x_local, gy_local = x_local.contiguous(), gy_local.contiguous()
    assert x_local.numel() == local_tokens * a.d_model

    def step():
        for p in module.parameters():
            p.grad = None
        xx = x_local.clone().requires_grad_()
        y = module(xx)
        y.backward(gy_local)

    for _ in range(a.warmup):
        step()
    times, comm = [], []
    for _ in range(a.repeats):
        dist.barrier()
        COUNTER.reset()
        COUNTER.active = True
        t0 = time.perf_counter()
        for _ in range(a.iters):
            step()
        elapsed = time.perf_counter() - t0
        COUNTER.active = False
        dist.barrier()
        times.append(elapsed / a.iters)
        comm.append({op: {k: (v / a.iters if k in ("calls", "bytes", "seconds") else v) for k, v in s.items()}
                     for op, s in COUNTER.stats.items()})
    extra = {}
    ds = [m for m in module.modules() if isinstance(m, DSWrap)]
    if ds and not a.ds_dropless:
        # Share of this rank's (token, choice) assignments DeepSpeed kept under its capacity (last step, first
        # MoE layer); exp_counts are the gate's per-expert assignment counts before dropping.
        counts = ds[0].last_exp_counts.double()
        tokens, k, e = local_tokens, a.top_k, a.experts
        cap = max(4, math.ceil(a.ds_capacity_factor * tokens * k / e))
        extra["ds_capacity"] = cap
        extra["ds_kept_fraction"] = float(counts.clamp(max=cap).sum() / counts.sum())
    return {"rank": rank, "local_tokens": local_tokens, "step_s": times, "comm": comm, **extra,
            "params_local": sum(p.numel() if not hasattr(p, "to_local") else p.to_local().numel()
                                for p in module.parameters())}


def summarize(variant: str, per_rank: list[dict], a) -> dict:
    repeats = len(per_rank[0]["step_s"])
    step_max = [max(r["step_s"][i] for r in per_rank) for i in range(repeats)]
    med = statistics.median_low(step_max)  # an actual repeat, whose comm numbers go with it
    imed = step_max.index(med) if med in step_max else 0
    comm_s = [sum(s["seconds"] for s in r["comm"][imed].values()) for r in per_rank]
    compute_s = max(r["step_s"][imed] - c for r, c in zip(per_rank, comm_s))
    ops = sorted({op for r in per_rank for op in r["comm"][imed]})
    collectives = {}
    for op in ops:
        rows = [r["comm"][imed].get(op, {"calls": 0, "bytes": 0, "seconds": 0.0, "sizes": []}) for r in per_rank]
        collectives[op] = {
            "calls_per_step": rows[0]["calls"],
            "bytes_per_step_per_rank": [int(round(x["bytes"])) for x in rows],
            "bytes_per_step_max_rank": int(round(max(x["bytes"] for x in rows))),
            "bytes_per_step_all_ranks": int(round(sum(x["bytes"] for x in rows))),
            "seconds_per_step_per_rank": [x["seconds"] for x in rows],
            "call_sizes_rank0": rows[0]["sizes"][: int(round(rows[0]["calls"]))],
        }
    return {
        "status": "ok",
        "tokens_per_rank": per_rank[0]["local_tokens"],
        "step_s_median": med,
        "step_s_all_repeats": step_max,
        "tokens_per_s": a.tokens / med,
        "comm_s_per_rank": comm_s,
        "compute_s": compute_s,
        "bytes_per_step_max_rank": sum(c["bytes_per_step_max_rank"] for c in collectives.values()),
        "bytes_per_step_all_ranks": sum(c["bytes_per_step_all_ranks"] for c in collectives.values()),
        "collectives": collectives,
        "params_local_rank0": per_rank[0]["params_local"],
        **({"ds_capacity": per_rank[0]["ds_capacity"],
            "ds_kept_fraction_per_rank": [r["ds_kept_fraction"] for r in per_rank]}
           if "ds_kept_fraction" in per_rank[0] else {}),
    }


def ratio(res: dict, a: str, b: str, key="tokens_per_s"):
    ra, rb = res.get(a, {}), res.get(b, {})
    if ra.get("status") != "ok" or rb.get("status") != "ok" or not rb.get(key):
        return None
    return ra[key] / rb[key]


def fmt_bytes(n) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024


def table(mode: str, res: dict, a) -> str:
    lines = [f"[{mode}] P={a.procs} d_model={a.d_model} E={a.experts} top_k={a.top_k} "
             f"expert_hidden={a.expert_hidden} dense_hidden={a.top_k * a.expert_hidden} global_tokens={a.tokens}"
             + (f" n_layers={a.n_layers} n_heads={a.n_heads} seq_len={a.seq_len}" if mode == "model" else ""),
             f"{'variant':<10} {'tok/rank':>8} {'step ms':>9} {'tokens/s':>10} {'comm ms':>8} {'compute ms':>10} "
             f"{'bytes/step/rank (max)':>22}  collectives (calls/step)"]
    for v, r in res.items():
        if r.get("status") != "ok":
            lines.append(f"{v:<10} {r.get('status')}: {r.get('error', '').strip().splitlines()[-1][:150]}")
            continue
        colls = ", ".join(f"{op} x{c['calls_per_step']:g}" for op, c in r["collectives"].items())
        if "ds_kept_fraction_per_rank" in r:
            colls += f"; kept {min(r['ds_kept_fraction_per_rank']):.0%} of assignments (capacity {r['ds_capacity']})"
        lines.append(f"{v:<10} {r['tokens_per_rank']:>8} {r['step_s_median'] * 1e3:>9.1f} {r['tokens_per_s']:>10.0f} "
                     f"{max(r['comm_s_per_rank']) * 1e3:>8.1f} {r['compute_s'] * 1e3:>10.1f} "
                     f"{fmt_bytes(r['bytes_per_step_max_rank']):>22}  {colls}")
    rs = []
    for b in ("alltoall", "deepspeed", "dense"):
        t = ratio(res, "pipeline", b)
        by = ratio(res, "pipeline", b, "bytes_per_step_max_rank")
        rs.append(f"pipeline/{b}: tokens/s {t:.2f}x" if t else f"pipeline/{b}: n/a")
        if by:
            rs[-1] += f", bytes/rank {by:.2f}x"
    lines.append("ratios  " + " | ".join(rs))
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--expert-hidden", type=int, default=512)
    p.add_argument("--expert-kernel", default="auto", choices=["auto", "grouped_mm", "padded_bmm", "loop"],
                   help="how ppmoe runs a rank's experts (auto: grouped_mm on CPU)")
    p.add_argument("--tokens", type=int, default=2048, help="global tokens per step")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--mode", choices=("block", "model", "both"), default="block")
    p.add_argument("--n-layers", type=int, default=2, help="model mode")
    p.add_argument("--n-heads", type=int, default=4, help="model mode")
    p.add_argument("--seq-len", type=int, default=256, help="model mode")
    p.add_argument("--ds-capacity-factor", type=float, default=1.0)
    p.add_argument("--ds-dropless", action="store_true", help="deepspeed drop_tokens=False (default: True)")
    p.add_argument("--out", default=str(REPO / "runs/bench/moe_dispatch.json"))
    a = p.parse_args(argv)
    if a.tokens % a.procs or a.experts % a.procs:
        p.error("--tokens and --experts must be divisible by --procs")
    if a.mode != "block" and (a.tokens % a.seq_len or (a.tokens // a.seq_len) % a.procs):
        p.error("model mode: tokens / seq_len sequences must split evenly over --procs")
    torch.set_num_threads(1)

    out = {"args": vars(a), "torch": torch.__version__, "cpu_count": os.cpu_count(),
           "note": "CPU + gloo loopback: ratios here are not GPU-cluster predictions; see cost_model.py"}
    try:
        import deepspeed

        out["deepspeed"] = deepspeed.__version__
    except Exception as e:  # optional dependency
        out["deepspeed"] = f"unavailable: {type(e).__name__}: {e}"
    modes = ("block", "model") if a.mode == "both" else (a.mode,)
    out["loadavg_before"] = os.getloadavg()
    for mode in modes:
        # Interleaved: each round launches every variant once (warm-up + `iters` timed steps), so drift in
        # the machine's load (shared cores) hits all variants alike; the median is over rounds.
        one = argparse.Namespace(**{**vars(a), "repeats": 1})
        samples: dict[str, list] = {v: [] for v in a.variants}
        errors: dict[str, str] = {}
        wall = {v: 0.0 for v in a.variants}
        for rnd in range(a.repeats):
            for v in a.variants:
                if v in errors:
                    continue
                t0 = time.time()
                try:
                    samples[v].append(run_ranks(worker, a.procs, v, one, mode))
                except Exception as e:
                    errors[v] = str(e)[-4000:]
                wall[v] += time.time() - t0
            print(f"  {mode}: round {rnd + 1}/{a.repeats} done", file=sys.stderr, flush=True)
        res = {}
        for v in a.variants:
            if v in errors:
                res[v] = {"status": "error", "error": errors[v]}
            else:
                per_rank = [{**s[0][r], "step_s": [x for s_ in s for x in s_[r]["step_s"]],
                             "comm": [x for s_ in s for x in s_[r]["comm"]]} for r in range(a.procs)
                            for s in [samples[v]]]
                res[v] = summarize(v, per_rank, a)
            res[v]["wall_s"] = wall[v]
        out[mode] = {"results": res, "ratios": {
            f"pipeline/{b}": {"tokens_per_s": ratio(res, "pipeline", b),
                              "bytes_per_step_max_rank": ratio(res, "pipeline", b, "bytes_per_step_max_rank")}
            for b in ("alltoall", "deepspeed", "dense")}}
        print(table(mode, res, a))
    out["loadavg_after"] = os.getloadavg()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {a.out}")
    return out


if __name__ == "__main__":
    main()
