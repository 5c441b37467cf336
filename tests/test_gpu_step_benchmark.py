"""benchmarks/gpu_step.py itself: it refuses politely without a GPU, its --smoke run (the GPU code path at toy
shapes on CPU) writes the JSON the report is read from, and every row of the real GPU run is a valid config of
the shapes it claims (so a GPU session is not spent on a config error)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_step.py"


def run_script(*args, timeout=180):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_refuses_without_a_gpu(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_script("--out", str(out))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "needs a CUDA GPU" in lines[0] and "--smoke" in lines[0]
    assert "Traceback" not in proc.stderr and not out.exists()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_step") / "smoke.json"
    proc = run_script("--smoke", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text()), proc.stdout


def test_smoke_training_rows(smoke):
    result, stdout = smoke
    assert result["smoke"] and result["device"] == "cpu"
    assert result["peak"]["measured_flops"] > 0 and result["peak"]["datasheet_flops"] is None
    rows = {(r["model"], r["variant"]): r for r in result["training"]}
    models = {"dense_350m", "dense_1p3b", "moe_350m_16e"}
    assert {m for m, _ in rows} == models
    for model in models:
        for variant in ("eager", "ac_selective_op", "ac_selective_2", "ac_full"):
            assert (model, variant) in rows
    assert not any("kernel" in v for m, v in rows if m != "moe_350m_16e")
    for (model, variant), r in rows.items():
        assert r["status"] == "ok", r
        assert r["tokens_per_s"] > 0 and r["step_s"] > 0 and r["peak_memory_gib"] > 0
        assert r["tokens_per_s"] * r["step_s"] == pytest.approx(r["tokens_per_step"])
        assert r["tokens_per_step"] == result["scale"]["global_batch"] * result["scale"]["seq_len"]
        assert r["mfu_measured_peak"] == pytest.approx(r["achieved_flops"] / result["peak"]["measured_flops"])
        assert r["mfu_datasheet_peak"] is None  # no data sheet for a CPU
        assert r["goal_mfu"] == (0.40 if model.startswith("moe") else 0.50)
        assert len(r["step_s_timed"]) == result["args"]["steps"]
        assert r["micro_batch"] == result["scale"]["micro_batch"][model] and not r["micro_batches_out_of_memory"]
        assert f"train.micro_batch_size={r['micro_batch']}" in r["overrides"]
        assert all(map(lambda x: x == x and abs(x) < 100, (r["loss_first"], r["loss_last"])))  # finite losses
    # The variant's key reaches the model that is trained.
    for kernel in ("grouped_mm", "padded_bmm", "loop"):
        assert rows[("moe_350m_16e", f"kernel_{kernel}")]["expert_kernel"] == kernel
    assert "MFU sheet" in stdout and ">= 50%" in stdout and ">= 40%" in stdout


def test_smoke_moe_block_and_patch_loss(smoke):
    result, stdout = smoke
    blocks = {r["expert_kernel"]: r for r in result["moe_block"]}
    assert set(blocks) == {"grouped_mm", "padded_bmm", "loop"}
    for r in blocks.values():
        assert r["status"] == "ok", r
        assert set(r["pieces_ms"]) == {"router", "permute", "experts", "combine"}
        assert all(ms > 0 for ms in r["pieces_ms"].values())
        assert r["ratio"] == pytest.approx(r["moe_block_ms"] / r["dense_ffn_ms"])
        assert r["goal_ratio"] == 1.15
    patch = result["patch_loss"]
    from patchtrain.kernels import TRITON_AVAILABLE

    assert patch["status"] == ("ok" if TRITON_AVAILABLE else "unavailable")
    if TRITON_AVAILABLE:
        assert patch["interpreted"] and patch["torch_ms"] > 0 and patch["triton_ms"] > 0
        assert patch["loss_abs_diff"] < 1e-5 and patch["grad_max_abs_diff"] < 1e-6  # fp32: the same loss
    assert "<= 1.15x" in stdout and "patch loss" in stdout


def test_gpu_rows_are_valid_configs_of_the_claimed_shapes(tmp_path):
    """The full-size rows (what a GPU session runs) pass the config rules, and the MoE model has the dense
    350M model's active matmul parameters (plus only its routers)."""
    from ppmoe.config import load_config, validate
    from ppmoe.model import count_parameters, model_shape
    from ppmoe.model.flops import matmul_params

    bench = load_script()
    shapes = {}
    for model in bench.MODELS:
        for variant, (_, needs_moe) in bench.VARIANTS.items():
            if needs_moe and "moe" not in model:
                continue
            overrides = bench.row_overrides(model, variant, bench.GPU_SCALE, False, tmp_path / "d", tmp_path / "o")
            cfg = load_config(bench.BASE_CONFIG, overrides)
            validate(cfg, 1)
            assert cfg.train.seq_len == 2048 and cfg.train.dtype == "bf16"
        shapes[model] = model_shape(cfg, bench.GPU_SCALE.vocab_size, "cuda")
    assert 0.33e9 < count_parameters(shapes["dense_350m"]) < 0.40e9
    assert 1.2e9 < count_parameters(shapes["dense_1p3b"]) < 1.45e9
    moe = shapes["moe_350m_16e"]
    assert (moe.moe.num_experts, moe.moe.top_k, moe.n_layers) == (16, 2, 24)
    routers = moe.n_layers * moe.d_model * moe.moe.num_experts
    assert matmul_params(moe) - routers == matmul_params(shapes["dense_350m"])


def test_out_of_memory_halves_the_micro_batch():
    """A row that does not fit runs again at half the micro-batch (same tokens per step), down to 1."""
    import torch

    bench = load_script()
    tried = []

    def run(micro_batch):
        tried.append(micro_batch)
        if micro_batch > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return {"tokens_per_s": 1.0}

    row = bench.fit_micro_batch(run, 4, torch.device("cpu"))
    assert tried == [4, 2, 1]
    assert row == {"tokens_per_s": 1.0, "micro_batch": 1, "micro_batches_out_of_memory": [4, 2]}
    with pytest.raises(torch.cuda.OutOfMemoryError):
        bench.fit_micro_batch(lambda micro_batch: run(2), 1, torch.device("cpu"))
