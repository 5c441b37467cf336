"""Project MoE-block step time from the CPU benchmark to clusters of 8-GPU nodes (alpha-beta cost model).

    python benchmarks/cost_model.py --from runs/bench/moe_dispatch.json [--gpus 8 16 64] \
        [--nvlink-gbs 150] [--ib-gbs 12.5] [--gpu-tflops 40 | --compute-speedup S] [--paper] \
        [--d-model D --experts E --top-k K --expert-hidden H --tokens-per-gpu T] [--out ...json]

Model, per GPU and per step (forward + backward of one MoE / FFN block):

    t = compute + sum over collectives c of (latency + cost_c(bytes_c))
    ring all-reduce over n ranks:   cost = 2 (n-1)/n * bytes / bw
    all-to-all over n ranks:        cost = (n-1)/n * bytes / bw
    bw = NVLink (default 150 GB/s effective bus bandwidth per GPU) when the group lies inside one 8-GPU node,
         InfiniBand (default 12.5 GB/s = 100 Gb/s per GPU, the paper's) when it spans nodes ("slowest link");
    --a2a hierarchical instead charges an all-to-all spanning nodes max((8-1)/n * bytes / NVLink,
         (n-8)/n * bytes / IB): only the share addressed to other nodes crosses IB, concurrently.
    bytes = what ONE rank passes to the collective (all-reduce: its buffer; all-to-all: its input, self-share
         included), the most loaded rank.

Layouts projected (N GPUs = N/8 nodes, t tokens per GPU per step; cluster tokens/s = N * t / step):
    dense     Megatron TP=8 inside a node (TP group handles 8t tokens, replicated); the other N/8 groups are
              pipeline / data parallel copies whose own communication is NOT modelled (PP point-to-point
              activations, bubbles, DP gradient all-reduce): per-GPU throughput is independent of N.
    pipeline  Pipeline-MoE, TP=8 inside a node, E/8 experts per GPU; same assumptions as dense (this is the
              paper's layout: TP=8 = experts per node, PP across nodes, DP=1).
    alltoall  ours, EP = min(N, E) ranks (the rest data parallel), each GPU t tokens of its own; the
              all-to-alls cross nodes when EP > 8. DP gradient all-reduce of replicated weights not modelled.
    deepspeed DeepSpeed-MoE (DPMoE) in the same layout as alltoall, with its own (capacity-padded) bytes.
  All variants thus do the same expert FLOPs per GPU per token (t tokens' worth); they differ in overhead
  (routing/permutation/padding compute) and communication.

Where the inputs come from:
  * bytes: COUNTED in the benchmark (moe_dispatch.json, per collective type, per step, most loaded rank),
    turned into bytes per token the rank held (all-reduce of a TP group: per token of the group batch;
    all-to-all: per token of the rank's own batch), then scaled to the projected shape: all-reduce bytes by
    d_target / d_measured, all-to-all bytes by (d k)_target / (d k)_measured. The counted bytes are checked
    against the analytic sizes (dense/pipeline: 2 T d 4 B; alltoall: 4 T k d 4 B; deepspeed: 4 E C d 4 B
    with C = max(4, ceil(cf T k / E))) and the check is printed. Precision: the benchmark runs fp32
    (4 B/elem); --bytes-per-elem 2 projects bf16/fp16 activations (scales every count by 2/4).
  * compute: the benchmark's compute_s (step time minus time inside collectives, slowest rank), as seconds
    per "work-share token" (compute_s * P / global tokens). Two ways to take it to a GPU:
      --gpu-tflops F (default 40, about a third of a V100's 125 TFLOP/s fp16 peak): compute per token =
         matmul FLOPs per token of the projected shape / F * overhead_v, where FLOPs = 3 (fwd+bwd) *
         (2*3*d*k*H [experts/FFN] + 2*d*E [router, MoE only]) and overhead_v = the variant's measured CPU
         time per FLOP relative to dense (routing, sorting, gathers, scatter-adds, padding). overhead
         transfers from CPU to GPU only roughly: on GPUs the memory-bound extra kernels weigh more.
         --no-overhead sets overhead_v = 1 (every variant at the dense FLOP rate: communication only).
      --compute-speedup S: compute per token = measured CPU compute per token * (FLOPs_target /
         FLOPs_measured) / S.
  * latency: --latency-us per collective call (default 0; the brief's model has no latency term).
  Not modelled: overlap of communication with compute, load imbalance between experts (the benchmark's
  router is untrained, near uniform), congestion; in block mode attention and the rest of the model.
  --mode model projects the benchmark's model-step section instead (attention is TP=8 for dense/pipeline,
  data parallel for alltoall/deepspeed, as measured), n_layers and seq_len as measured.

Paper claims to compare with (arXiv 2304.11414): Pipeline-MoE >= 1.75x the DPMoE baseline throughput, and
about 90% of its dense backbone's throughput.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NODE = 8
VARIANTS = ("dense", "pipeline", "alltoall", "deepspeed")
TP_VARIANTS = ("dense", "pipeline")


def flops_per_token(d: int, k: int, h: int, e: int, moe: bool, layers: int = 0, seq: int = 0) -> float:
    """fwd+bwd matmul FLOPs per token: 3 x (SwiGLU 2*3*d*(k*h) + router 2*d*E); with layers > 0 (model mode)
    per layer that plus attention 2*4*d*d (q, k, v, o) + 2*2*seq*d (scores and values, full square)."""
    ffn = 3.0 * (2 * 3 * d * k * h + (2 * d * e if moe else 0))
    if not layers:
        return ffn
    return layers * (ffn + 3.0 * (2 * 4 * d * d + 2 * 2 * seq * d))


def analytic_bytes(v: str, tokens_rank: int, d: int, k: int, e: int, cf: float, elem: int = 4) -> float:
    if v in TP_VARIANTS:
        return 2 * tokens_rank * d * elem  # forward all-reduce of y, backward all-reduce of dx
    if v == "alltoall":
        return 4 * tokens_rank * k * d * elem  # dispatch + combine, forward and backward (dropless)
    cap = max(4, math.ceil(cf * tokens_rank * k / e))
    return 4 * e * cap * d * elem


def collective_cost(op: str, nbytes: float, n: int, a) -> float:
    if n <= 1 or nbytes <= 0:
        return 0.0
    nv, ib = a.nvlink_gbs * 1e9, a.ib_gbs * 1e9
    inside = n <= NODE
    if op == "all_reduce":
        return 2 * (n - 1) / n * nbytes / (nv if inside else ib)
    if op in ("all_to_all_single", "all_to_all"):
        if inside:
            return (n - 1) / n * nbytes / nv
        if a.a2a == "slowest":
            return (n - 1) / n * nbytes / ib
        return max((NODE - 1) / n * nbytes / nv, (n - NODE) / n * nbytes / ib)
    if op in ("all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "reduce_scatter"):
        return (n - 1) / n * nbytes / (nv if inside else ib)
    raise ValueError(f"no cost formula for collective {op!r}")


def project(bench: dict, a) -> dict:
    mode = a.mode
    if mode not in bench:
        sys.exit(f"{a.source} has no {mode!r} results")
    args = bench["args"]
    P, T = args["procs"], args["tokens"]
    dm, km, hm, em = args["d_model"], args["top_k"], args["expert_hidden"], args["experts"]
    d = a.d_model or dm
    k = a.top_k or km
    h = a.expert_hidden or hm
    e = a.experts or em
    t = a.tokens_per_gpu or T // P
    layers, seq = (args["n_layers"], args["seq_len"]) if mode == "model" else (0, 0)
    elem_scale = a.bytes_per_elem / 4
    res = bench[mode]["results"]
    ok = {v: r for v, r in res.items() if r.get("status") == "ok"}
    if "dense" not in ok and a.compute_speedup is None and not a.no_overhead:
        sys.exit("--gpu-tflops needs the dense result (overheads are relative to it); use --compute-speedup")

    inputs, checks = {}, {}
    for v, r in ok.items():
        moe = v != "dense"
        f_meas = flops_per_token(dm, km, hm, em, moe, layers, seq)
        f_tgt = flops_per_token(d, k, h, e, moe, layers, seq)
        cpu_per_token = r["compute_s"] * P / T  # seconds per work-share token on one CPU rank
        tokens_rank = r["tokens_per_rank"]
        counted = r["bytes_per_step_max_rank"]
        expect = analytic_bytes(v, tokens_rank, dm, km, em, args.get("ds_capacity_factor", 1.0))
        if mode == "model":  # + TP attention's two all-reduces per layer; all per layer
            expect = layers * (expect + (2 * tokens_rank * dm * 4 if v in TP_VARIANTS else 0))
        if v == "deepspeed" and args.get("ds_dropless"):
            expect = float("nan")  # dropless: capacity = the busiest expert's count, data dependent
        checks[v] = {"counted_bytes": counted, "analytic_bytes": expect, "counted/analytic": counted / expect}
        per_token = {}
        for op, c in r["collectives"].items():
            scale = d / dm if op == "all_reduce" else (d * k) / (dm * km)
            per_token[op] = {"bytes": c["bytes_per_step_max_rank"] / tokens_rank * scale * elem_scale,
                             "calls": c["calls_per_step"]}
        inputs[v] = {"cpu_compute_s_per_token": cpu_per_token, "cpu_s_per_flop": cpu_per_token / f_meas,
                     "flops_per_token_target": f_tgt, "flops_per_token_measured": f_meas,
                     "bytes_per_token_by_op": per_token}
    for v, x in inputs.items():
        if a.compute_speedup is not None:
            x["gpu_compute_s_per_token"] = x["cpu_compute_s_per_token"] * x["flops_per_token_target"] \
                / x["flops_per_token_measured"] / a.compute_speedup
        else:
            x["overhead_vs_dense"] = 1.0 if a.no_overhead else x["cpu_s_per_flop"] / inputs["dense"]["cpu_s_per_flop"]
            x["gpu_compute_s_per_token"] = x["flops_per_token_target"] / (a.gpu_tflops * 1e12) * x["overhead_vs_dense"]

    proj = {}
    for n in a.gpus:
        row = {}
        for v, x in inputs.items():
            if v in TP_VARIANTS:
                group, rank_tokens = NODE, NODE * t  # TP=8: the group batch is replicated on each rank
                if v == "pipeline" and e % NODE:
                    row[v] = {"error": f"E={e} not divisible by TP={NODE}"}
                    continue
            else:
                group, rank_tokens = min(n, e), t
                if e % group:
                    row[v] = {"error": f"E={e} not divisible by EP={group}"}
                    continue
            compute = x["gpu_compute_s_per_token"] * t
            comm_by_op = {op: c["calls"] * a.latency_us * 1e-6
                          + collective_cost(op, c["bytes"] * rank_tokens, group, a)
                          for op, c in x["bytes_per_token_by_op"].items()}
            comm = sum(comm_by_op.values())
            step = compute + comm
            row[v] = {"group": group, "spans_nodes": group > NODE, "compute_ms": compute * 1e3,
                      "comm_ms": comm * 1e3, "comm_ms_by_op": {o: s * 1e3 for o, s in comm_by_op.items()},
                      "step_ms": step * 1e3, "tokens_per_s": n * t / step, "tokens_per_s_per_gpu": t / step}
        ratios = {}
        for b in ("alltoall", "deepspeed", "dense"):
            pa, pb = row.get("pipeline", {}), row.get(b, {})
            ratios[f"pipeline/{b}"] = pa["tokens_per_s"] / pb["tokens_per_s"] \
                if "tokens_per_s" in pa and "tokens_per_s" in pb else None
        proj[str(n)] = {"variants": row, "ratios": ratios}
    return {"source": str(a.source), "mode": mode,
            "measured": {"procs": P, "global_tokens": T, "d_model": dm, "top_k": km, "expert_hidden": hm,
                         "experts": em},
            "target": {"d_model": d, "top_k": k, "expert_hidden": h, "experts": e, "tokens_per_gpu": t,
                       "bytes_per_elem": a.bytes_per_elem},
            "params": {"nvlink_gbs": a.nvlink_gbs, "ib_gbs": a.ib_gbs, "gpu_tflops": a.gpu_tflops,
                       "compute_speedup": a.compute_speedup, "latency_us": a.latency_us, "a2a": a.a2a,
                       "gpus_per_node": NODE},
            "byte_checks": checks, "inputs": inputs, "projection": proj,
            "skipped": {v: r.get("error", "")[-300:] for v, r in res.items() if r.get("status") != "ok"},
            "paper_claims": {"pipeline/deepspeed": ">= 1.75", "pipeline/dense": "~0.90"}}


def table(out: dict) -> str:
    tg, pr = out["target"], out["params"]
    comp = (f"compute-speedup {pr['compute_speedup']}" if pr["compute_speedup"] is not None
            else f"gpu {pr['gpu_tflops']} TFLOP/s x measured overhead")
    lines = [f"projection: d_model={tg['d_model']} E={tg['experts']} top_k={tg['top_k']} "
             f"expert_hidden={tg['expert_hidden']} tokens/GPU={tg['tokens_per_gpu']} "
             f"bytes/elem={tg['bytes_per_elem']} | NVLink {pr['nvlink_gbs']} GB/s, IB {pr['ib_gbs']} GB/s, "
             f"a2a={pr['a2a']}, latency {pr['latency_us']} us, {comp}",
             "byte check (counted / analytic): " + ", ".join(
                 f"{v} {c['counted/analytic']:.3f}" for v, c in out["byte_checks"].items()),
             "overhead vs dense (CPU time/FLOP): " + ", ".join(
                 f"{v} {x.get('overhead_vs_dense', float('nan')):.2f}" for v, x in out["inputs"].items()),
             f"{'GPUs':>4} {'variant':<10} {'group':>5} {'compute ms':>10} {'comm ms':>9} {'step ms':>9} "
             f"{'tokens/s':>12} {'tok/s/GPU':>10}"]
    for n, p in out["projection"].items():
        for v, r in p["variants"].items():
            if "error" in r:
                lines.append(f"{n:>4} {v:<10} {r['error']}")
                continue
            grp = f"{'TP' if v in TP_VARIANTS else 'EP'}{r['group']}"
            lines.append(f"{n:>4} {v:<10} {grp:>5} {r['compute_ms']:>10.3f} {r['comm_ms']:>9.3f} "
                         f"{r['step_ms']:>9.3f} {r['tokens_per_s']:>12.0f} {r['tokens_per_s_per_gpu']:>10.0f}")
        lines.append(f"{n:>4} ratios: " + " | ".join(
            f"{k} {v:.2f}x" if v is not None else f"{k} n/a" for k, v in p["ratios"].items()))
    for v, err in out["skipped"].items():
        lines.append(f"skipped {v}: {err.strip().splitlines()[-1] if err.strip() else ''}")
    lines.append("paper: pipeline/DPMoE >= 1.75x, pipeline/dense ~0.90")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--from", dest="source", default=str(REPO / "runs/bench/moe_dispatch.json"))
    p.add_argument("--mode", default="block", choices=("block", "model"),
                   help="which section of the benchmark JSON; model: whole small model (attention + FFN "
                        "variant per block; n_layers and seq_len stay as measured, attention FLOPs included)")
    p.add_argument("--gpus", type=int, nargs="+", default=[8, 16, 64])
    p.add_argument("--nvlink-gbs", type=float, default=150.0)
    p.add_argument("--ib-gbs", type=float, default=12.5)
    p.add_argument("--a2a", choices=("slowest", "hierarchical"), default="slowest")
    p.add_argument("--latency-us", type=float, default=0.0)
    p.add_argument("--gpu-tflops", type=float, default=40.0)
    p.add_argument("--no-overhead", action="store_true",
                   help="with --gpu-tflops: every variant at the dense FLOP rate (communication-only comparison)")
    p.add_argument("--compute-speedup", type=float, default=None,
                   help="instead of --gpu-tflops: GPU compute = measured CPU compute / this")
    p.add_argument("--bytes-per-elem", type=int, default=4, help="4: fp32 as measured; 2: bf16 activations")
    p.add_argument("--d-model", type=int, default=None)
    p.add_argument("--experts", type=int, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--expert-hidden", type=int, default=None)
    p.add_argument("--tokens-per-gpu", type=int, default=None)
    p.add_argument("--paper", action="store_true",
                   help="project the paper's 6.7B-style MoE: GPT-3-Medium backbone d=1024, E=64, top-1, "
                        "expert hidden 4096, 2048 tokens per GPU, fp16 activations (explicit flags win)")
    p.add_argument("--out", default=None, help="default: <from>_cost.json")
    a = p.parse_args(argv)
    if a.paper:
        for name, val in (("d_model", 1024), ("experts", 64), ("top_k", 1), ("expert_hidden", 4096),
                          ("tokens_per_gpu", 2048)):
            if getattr(a, name) is None:
                setattr(a, name, val)
        if "--bytes-per-elem" not in (argv or sys.argv):
            a.bytes_per_elem = 2
    bench = json.loads(Path(a.source).read_text())
    out = project(bench, a)
    print(table(out))
    dest = Path(a.out or str(Path(a.source).with_suffix("")) + ("_cost_paper.json" if a.paper else "_cost.json"))
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=1))
    print(f"wrote {dest}")
    return out


if __name__ == "__main__":
    main()
