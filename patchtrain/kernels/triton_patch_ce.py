"""Fused triton next-patch cross-entropy: same semantics as `patchtrain.loss.patch_cross_entropy`.

    loss = mean_rows( logsumexp(logits[row]) - mean_k logits[row, targets[row, k]] )

Forward: one program per row streams over the vocabulary in BLOCK_V chunks with an online max /
sum-exp in fp32 (inputs fp32 / bf16 / fp16), so neither the softmax nor the log-softmax is ever
materialised; it writes the per-row lse (saved for backward) and the per-row loss, and the host
averages over rows. Backward: one program per row recomputes the softmax from the saved lse and writes

    grad[row, v] = g / N * (exp(logit - lse) - count_k(v) / K)

in the logits' dtype (one rounding), where count_k(v) counts the row's targets equal to v (duplicates
handled by comparing each vocabulary chunk against all K targets, so no read-modify-write is needed).

Importing this module never fails: without triton, TRITON_AVAILABLE is False and calling the loss
raises. The kernels are jitted lazily at the first call, so TRITON_INTERPRET=1 (CPU interpreter, used
by the tests) takes effect even when it is set after this module is imported.
"""

import functools

import torch

try:
    import triton
    import triton.language as tl

    TRITON_AVAILABLE = True
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    TRITON_AVAILABLE = False

__all__ = ["TRITON_AVAILABLE", "triton_patch_cross_entropy", "TritonPatchCrossEntropy"]

MAX_BLOCK_V = 4096

if TRITON_AVAILABLE:
    # Reductions go through tl.reduce with triton's own combine functions (what tl.max / tl.sum do for
    # fp32) instead of the @jit helpers tl.max / tl.sum / tl.zeros: those helpers are jitted when triton
    # is imported, so if something (e.g. `import torch._dynamo`) imported triton before TRITON_INTERPRET=1
    # was set, they cannot run under the interpreter, while builtins and these combine functions can
    # (the interpreter recognises them and reduces with numpy).

    def _patch_ce_fwd_kernel(
        logits_ptr, stride_lr, stride_lv,
        targets_ptr, stride_tr, stride_tk,
        lse_ptr, loss_ptr,
        V, K,
        BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * stride_lr
        offs = tl.arange(0, BLOCK_V)
        m = tl.full([], float("-inf"), tl.float32)  # running max
        s = tl.full([], 0.0, tl.float32)  # running sum of exp(x - m)
        for start in range(0, V, BLOCK_V):
            idx = start + offs
            x = tl.load(row_ptr + idx.to(tl.int64) * stride_lv, mask=idx < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.reduce(x, 0, tl.standard._elementwise_max))
            # a chunk (or row) of only -inf keeps m_new == -inf: shift by 0 instead to avoid inf - inf
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp(m - m_safe) + tl.reduce(tl.exp(x - m_safe), 0, tl.standard._sum_combine)
            m = m_new
        lse = m + tl.log(s)

        k_offs = tl.arange(0, BLOCK_K)
        k_mask = k_offs < K
        tgt = tl.load(targets_ptr + row * stride_tr + k_offs * stride_tk, mask=k_mask, other=0).to(tl.int64)
        picked = tl.load(row_ptr + tgt * stride_lv, mask=k_mask, other=0.0).to(tl.float32)
        loss = lse - tl.reduce(picked, 0, tl.standard._sum_combine) / K

        tl.store(lse_ptr + row, lse)
        tl.store(loss_ptr + row, loss)

    def _patch_ce_bwd_kernel(
        logits_ptr, stride_lr, stride_lv,
        targets_ptr, stride_tr, stride_tk,
        lse_ptr, grad_out_ptr,
        grad_ptr, stride_gr, stride_gv,
        N, V, K,
        BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * stride_lr
        grow_ptr = grad_ptr + row * stride_gr
        scale = tl.load(grad_out_ptr).to(tl.float32) / N  # d(mean over rows)
        lse = tl.load(lse_ptr + row)

        k_offs = tl.arange(0, BLOCK_K)
        k_mask = k_offs < K
        tgt = tl.load(targets_ptr + row * stride_tr + k_offs * stride_tk, mask=k_mask, other=-1).to(tl.int64)
        tgt = tl.where(k_mask, tgt, -1)  # padding slots never match a vocabulary index

        offs = tl.arange(0, BLOCK_V)
        for start in range(0, V, BLOCK_V):
            idx = start + offs
            v_mask = idx < V
            x = tl.load(row_ptr + idx.to(tl.int64) * stride_lv, mask=v_mask, other=float("-inf")).to(tl.float32)
            p = tl.exp(x - lse)
            hits = (idx.to(tl.int64)[:, None] == tgt[None, :]).to(tl.float32)  # [BLOCK_V, BLOCK_K]
            count = tl.reduce(hits, 1, tl.standard._sum_combine)
            g = scale * (p - count / K)
            tl.store(grow_ptr + idx.to(tl.int64) * stride_gv, g.to(grad_ptr.dtype.element_ty), mask=v_mask)


@functools.lru_cache(maxsize=None)
def _kernels(interpret: bool):
    """The jitted kernels; keyed on the interpreter knob since triton.jit picks interpreter vs compiler
    at decoration time."""
    del interpret  # only part of the cache key
    return triton.jit(_patch_ce_fwd_kernel), triton.jit(_patch_ce_bwd_kernel)


def _interpreting() -> bool:
    return bool(triton.knobs.runtime.interpret)


def _launch_config(V: int, block_v):
    if block_v is None:
        block_v = min(triton.next_power_of_2(max(V, 1)), MAX_BLOCK_V)
    if block_v <= 0 or block_v & (block_v - 1):
        raise ValueError(f"block_v must be a positive power of two, got {block_v}")
    num_warps = 8 if block_v >= 2048 else 4
    return block_v, num_warps


def _check_inputs(logits: torch.Tensor, targets: torch.Tensor) -> None:
    if not TRITON_AVAILABLE:
        raise RuntimeError("triton is not installed; use patchtrain.loss.patch_cross_entropy instead")
    if logits.dim() != 2 or targets.dim() != 2:
        raise ValueError(f"expected logits [N, V] and targets [N, K], got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}")
    if targets.shape[0] != logits.shape[0]:
        raise ValueError(f"logits have {logits.shape[0]} rows but targets have {targets.shape[0]}")
    if targets.shape[1] < 1:
        raise ValueError("targets must have K >= 1 columns")
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"logits must be float32, bfloat16 or float16, got {logits.dtype}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be int64 or int32, got {targets.dtype}")
    if targets.device != logits.device:
        raise ValueError(f"logits on {logits.device} but targets on {targets.device}")
    if logits.device.type != "cuda" and not _interpreting():
        raise RuntimeError(f"the triton patch loss needs CUDA tensors (got {logits.device}); set "
                           "TRITON_INTERPRET=1 to run it on CPU, or use patchtrain.loss.patch_cross_entropy")


class TritonPatchCrossEntropy(torch.autograd.Function):
    """autograd wrapper: forward(logits [N, V], targets [N, K], block_v) -> 0-d fp32 mean loss."""

    @staticmethod
    def forward(ctx, logits, targets, block_v=None):
        _check_inputs(logits, targets)
        n, v = logits.shape
        k = targets.shape[1]
        block_v, num_warps = _launch_config(v, block_v)
        block_k = triton.next_power_of_2(k)
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        row_loss = torch.empty(n, dtype=torch.float32, device=logits.device)
        if n > 0:
            fwd, _ = _kernels(_interpreting())
            fwd[(n,)](
                logits, logits.stride(0), logits.stride(1),
                targets, targets.stride(0), targets.stride(1),
                lse, row_loss,
                v, k,
                BLOCK_V=block_v, BLOCK_K=block_k, num_warps=num_warps,
            )
        ctx.save_for_backward(logits, targets, lse)
        ctx.block_v = block_v
        return row_loss.mean()

    @staticmethod
    def backward(ctx, grad_output):
        logits, targets, lse = ctx.saved_tensors
        n, v = logits.shape
        k = targets.shape[1]
        block_v, num_warps = _launch_config(v, ctx.block_v)
        block_k = triton.next_power_of_2(k)
        grad = torch.empty((n, v), dtype=logits.dtype, device=logits.device)
        if n > 0:
            _, bwd = _kernels(_interpreting())
            g = grad_output.detach().to(device=logits.device, dtype=torch.float32).reshape(1).contiguous()
            bwd[(n,)](
                logits, logits.stride(0), logits.stride(1),
                targets, targets.stride(0), targets.stride(1),
                lse, g,
                grad, grad.stride(0), grad.stride(1),
                n, v, k,
                BLOCK_V=block_v, BLOCK_K=block_k, num_warps=num_warps,
            )
        return grad, None, None


def triton_patch_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, *, block_v=None) -> torch.Tensor:
    """Fused next-patch loss. logits [N, V] (fp32/bf16/fp16, any strides), targets [N, K] int64/int32
    (values in [0, V), not checked on device) -> mean loss (0-d fp32); differentiable w.r.t. logits.

    block_v: vocabulary chunk per loop step (power of two); default min(next_pow2(V), 4096)."""
    return TritonPatchCrossEntropy.apply(logits, targets, block_v)
