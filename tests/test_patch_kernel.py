"""The fused triton next-patch loss against the torch reference (patchtrain.loss.patch_cross_entropy).

Runs on CPU under triton's interpreter (TRITON_INTERPRET=1, set before triton is imported; the kernels
are jitted lazily, so it also works if triton was imported earlier), or on CUDA when the interpreter is
off. The interpreter costs ~0.5 ms per program instance: shapes stay tiny."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")

from patchtrain.kernels import select_patch_loss  # noqa: E402
from patchtrain.kernels.triton_patch_ce import (  # noqa: E402
    TRITON_AVAILABLE,
    triton_patch_cross_entropy,
)
from patchtrain.loss import patch_cross_entropy  # noqa: E402


@pytest.fixture(scope="module")
def device():
    if triton.knobs.runtime.interpret:
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    pytest.fail("the triton kernel needs a CUDA device or TRITON_INTERPRET=1 (this file sets it unless the "
                "environment says otherwise): unset TRITON_INTERPRET=0 to run it on CPU")


def make_targets(n, v, k, gen):
    """Random targets with duplicates: row 0 repeats one token K times, row 1 (K > 2) repeats one twice."""
    t = torch.randint(0, v, (n, k), generator=gen)
    t[0, :] = t[0, 0]
    if n > 1 and k > 2:
        t[1, 1] = t[1, 0]
    return t


def run_both(logits, targets, grad_scale=1.0, **kw):
    """(loss, grad) from the triton kernel and from the fp32 torch reference on the same values."""
    a = logits.detach().clone().requires_grad_()
    b = logits.detach().float().clone().requires_grad_()
    loss_t = triton_patch_cross_entropy(a, targets, **kw)
    (loss_t * grad_scale).backward()
    loss_r = patch_cross_entropy(b, targets)
    (loss_r * grad_scale).backward()
    return loss_t, a.grad, loss_r, b.grad


@pytest.mark.parametrize("n,v,k,block_v", [
    (4, 300, 4, 64),   # V not a multiple of BLOCK_V, several chunks
    (7, 130, 2, 128),  # two chunks, the last nearly empty
    (3, 50, 1, 64),    # one partial chunk, K=1
    (16, 97, 4, 32),   # more rows, prime V
])
def test_matches_reference_fp32(device, n, v, k, block_v):
    gen = torch.Generator().manual_seed(n * 1000 + v)
    logits = (torch.randn(n, v, generator=gen) * 2).to(device)
    targets = make_targets(n, v, k, gen).to(device)
    loss_t, grad_t, loss_r, grad_r = run_both(logits, targets, grad_scale=0.7, block_v=block_v)
    assert loss_t.dtype == torch.float32 and loss_t.dim() == 0
    torch.testing.assert_close(loss_t, loss_r, atol=1e-5, rtol=1e-5)
    assert grad_t.dtype == torch.float32 and grad_t.shape == (n, v)
    torch.testing.assert_close(grad_t, grad_r, atol=1e-6, rtol=1e-5)


def test_duplicate_targets_gradient(device):
    """A row whose K targets are all the same token gets the full -g/N at that token (count = K)."""
    n, v, k = 2, 70, 4
    logits = torch.zeros(n, v, device=device)
    targets = torch.tensor([[5, 5, 5, 5], [3, 3, 66, 9]], device=device)
    x = logits.clone().requires_grad_()
    triton_patch_cross_entropy(x, targets, block_v=32).backward()
    p = 1.0 / v
    expected = torch.full((n, v), p / n)
    expected[0, 5] -= 1.0 / n
    expected[1, 3] -= 2.0 / (n * k)
    expected[1, 66] -= 1.0 / (n * k)
    expected[1, 9] -= 1.0 / (n * k)
    torch.testing.assert_close(x.grad.cpu(), expected, atol=1e-7, rtol=1e-6)


def test_default_block_and_grad_sums_to_zero(device):
    """Default BLOCK_V (one chunk covering V); each row's gradient sums to 0 (softmax minus targets)."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 300, generator=gen).to(device)
    targets = make_targets(5, 300, 2, gen).to(device)
    loss_t, grad_t, loss_r, grad_r = run_both(logits, targets)
    torch.testing.assert_close(loss_t, loss_r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_t, grad_r, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad_t.sum(-1).cpu(), torch.zeros(5), atol=1e-6, rtol=0)


def test_extreme_logits(device):
    """Large magnitudes: the running max must be rescaled across chunks (a naive exp overflows)."""
    gen = torch.Generator().manual_seed(2)
    n, v, k = 4, 200, 2
    logits = torch.randn(n, v, generator=gen) * 1e3
    logits[0] += 3e4                 # everything huge
    logits[1] -= 3e4                 # everything hugely negative
    logits[2, 190] = 8e4             # the max only shows up in the last chunk
    logits[3, :64] = float("-inf")   # a first chunk of only -inf (masked vocabulary)
    targets = make_targets(n, v, k, gen)
    targets[3] = torch.tensor([64, 150])
    logits, targets = logits.to(device), targets.to(device)
    loss_t, grad_t, loss_r, grad_r = run_both(logits, targets, block_v=64)
    assert torch.isfinite(loss_t)
    torch.testing.assert_close(loss_t, loss_r, atol=1e-5, rtol=1e-6)
    assert torch.isfinite(grad_t).all()
    torch.testing.assert_close(grad_t, grad_r, atol=1e-6, rtol=1e-5)


def test_non_contiguous_inputs(device):
    """Strided logits (a column slice and a transpose) and transposed targets are read via strides."""
    gen = torch.Generator().manual_seed(3)
    n, v, k = 6, 150, 4
    wide = torch.randn(n, 2 * v, generator=gen).to(device)
    targets = torch.randint(0, v, (k, n), generator=gen).to(device).t()  # [n, k], stride (1, n)
    assert not targets.is_contiguous()
    for logits in (wide[:, ::2], torch.randn(v, n, generator=gen).to(device).t()):
        assert not logits.is_contiguous()
        loss_t, grad_t, loss_r, grad_r = run_both(logits, targets, block_v=64)
        torch.testing.assert_close(loss_t, loss_r, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad_t, grad_r, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(device, dtype):
    gen = torch.Generator().manual_seed(4)
    n, v, k = 6, 260, 4
    ref_logits = torch.randn(n, v, generator=gen) * 3
    targets = make_targets(n, v, k, gen)
    loss_fp32 = patch_cross_entropy(ref_logits, targets)
    logits = ref_logits.to(dtype).to(device)
    loss_t, grad_t, loss_r, grad_r = run_both(logits, targets.to(device), block_v=64)
    assert loss_t.dtype == torch.float32
    assert abs(loss_t.item() - loss_fp32.item()) < 1e-2       # vs the fp32 reference on fp32 data
    torch.testing.assert_close(loss_t, loss_r, atol=1e-5, rtol=1e-5)  # same (rounded) values in fp32
    assert grad_t.dtype == dtype
    torch.testing.assert_close(grad_t.float(), grad_r, atol=1e-3, rtol=1e-2)


def test_bad_inputs_raise(device):
    logits = torch.randn(4, 30, device=device)
    with pytest.raises(ValueError, match="rows"):
        triton_patch_cross_entropy(logits, torch.zeros(3, 2, dtype=torch.long, device=device))
    with pytest.raises(ValueError, match=r"\[N, V\]"):
        triton_patch_cross_entropy(logits[0], torch.zeros(4, 2, dtype=torch.long, device=device))
    with pytest.raises(TypeError, match="targets"):
        triton_patch_cross_entropy(logits, torch.zeros(4, 2, device=device))
    with pytest.raises(ValueError, match="power of two"):
        triton_patch_cross_entropy(logits, torch.zeros(4, 2, dtype=torch.long, device=device), block_v=48)


def test_select_patch_loss(monkeypatch):
    monkeypatch.delenv("PPMOE_FORCE_TRITON", raising=False)
    assert select_patch_loss(torch.device("cpu")) is patch_cross_entropy
    assert TRITON_AVAILABLE
    assert select_patch_loss(torch.device("cuda")) is triton_patch_cross_entropy
    monkeypatch.setenv("PPMOE_FORCE_TRITON", "0")
    assert select_patch_loss(torch.device("cpu")) is patch_cross_entropy
    monkeypatch.setenv("PPMOE_FORCE_TRITON", "1")
    assert select_patch_loss(torch.device("cpu")) is triton_patch_cross_entropy
