"""moe.expert_kernel 'auto' (ppmoe.moe.experts.resolve_kernel): the decision table, without a GPU (the
device capability and the compute dtype are passed in), and the dtype threaded from train.dtype."""

import pytest

from ppmoe.config import load_config
from ppmoe.model import model_shape
from ppmoe.moe.experts import resolve_kernel

HOPPER, AMPERE, BLACKWELL = (9, 0), (8, 0), (10, 0)


@pytest.mark.parametrize("device, capability, dtype, d_model, hidden, expected", [
    # CUDA: grouped_mm needs Hopper or newer, bf16 compute and 16-byte rows (multiples of 8 in bf16)
    ("cuda", HOPPER, "bf16", 1024, 2816, "grouped_mm"),
    ("cuda", BLACKWELL, "bf16", 1024, 2816, "grouped_mm"),
    ("cuda", AMPERE, "bf16", 1024, 2816, "padded_bmm"),
    ("cuda", HOPPER, "fp32", 1024, 2816, "padded_bmm"),
    ("cuda", HOPPER, "bf16", 1024, 2820, "padded_bmm"),  # 5640-byte rows: not 16-byte aligned
    ("cuda", HOPPER, "bf16", 1028, 2816, "padded_bmm"),
    # CPU: grouped_mm whenever the rows are aligned (4 fp32 / 8 bf16 values)
    ("cpu", None, "fp32", 36, 64, "grouped_mm"),
    ("cpu", None, "bf16", 36, 64, "padded_bmm"),
    ("cpu", None, "bf16", 40, 64, "grouped_mm"),
    ("cpu", None, "fp32", 6, 12, "padded_bmm"),
])
def test_auto_decision_table(device, capability, dtype, d_model, hidden, expected):
    assert resolve_kernel("auto", device, d_model, hidden, dtype, capability) == expected


@pytest.mark.parametrize("name", ["loop", "padded_bmm", "grouped_mm"])
def test_an_explicit_kernel_is_kept(name):
    assert resolve_kernel(name, "cuda", 1024, 2816, "fp32", AMPERE) == name


def test_model_shape_passes_the_compute_dtype():
    """d_model 36 has 16-byte rows in fp32 (9 x 16 bytes) but not in bf16 (72 bytes)."""
    base = ["model.d_model=36", "model.n_heads=2", "moe.num_experts=2", "moe.expert_hidden=64"]
    assert model_shape(load_config(None, [*base, "train.dtype=fp32"]), 100, "cpu").moe.expert_kernel == "grouped_mm"
    assert model_shape(load_config(None, [*base, "train.dtype=bf16"]), 100, "cpu").moe.expert_kernel == "padded_bmm"
