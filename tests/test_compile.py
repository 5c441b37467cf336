"""torch.compile per block (`train.compile`, ppmoe.parallel.compile_blocks) trains like the eager model.

Inductor fuses elementwise ops and may reorder reductions, so compiled and eager agree to fp32 tolerance,
not bit for bit: losses over 3 steps to rtol 1e-4. Kept small: compiling is slow on a loaded CPU.
One process: a model with a dense and an MoE block (router jitter on), compiled alone and after full and
per-op activation checkpointing. Then gloo runs against the one-process eager run: tp2 with Pipeline-MoE
(experts_in_tp, DTensor TP) and per-op checkpointing, and two ranks of FSDP2 with the MoE layer.
"""

import pytest
import torch

from multiproc import run_ranks
from ppmoe.model.build import build_model
from ppmoe.model.gpt import GPTShape
from ppmoe.moe import MoEShape
from ppmoe.parallel.activation_checkpointing import apply_activation_checkpointing
from ppmoe.parallel.compile_blocks import apply_compile
from test_parallel_equivalence import MOE, train_and_report

SHAPE = GPTShape(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, ffn_hidden=64, vocab_size=64, max_seq_len=16,
                 moe=MoEShape(num_experts=4, top_k=2, every=2, expert_hidden=32, shared_expert_hidden=0,
                              shared_expert_gate=False, normalize_topk=True, jitter=0.1, capacity_factor=None,
                              aux_loss_coef=0.01, z_loss_coef=0.001, expert_kernel="grouped_mm"))


def losses(compile: bool, checkpointing: str, every: int = 0, steps: int = 3) -> tuple[torch.Tensor, list[str]]:
    model = build_model(SHAPE, seed=1)
    model.train()
    apply_activation_checkpointing(model, checkpointing, every)
    apply_compile(model, compile)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    batch = torch.randint(0, SHAPE.vocab_size, (2, SHAPE.max_seq_len), generator=torch.Generator().manual_seed(0))
    out = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        out.append(loss.detach())
    return torch.stack(out), list(model.state_dict().keys())


def test_compiled_blocks_match_eager():
    torch._dynamo.reset()
    eager, names = losses(False, "none")
    assert eager[-1] < eager[0]
    for checkpointing in ("none", "full", "selective"):
        compiled, compiled_names = losses(True, checkpointing)
        assert compiled_names == names  # compiling keeps the parameter names (checkpoint keys)
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=0, msg=lambda m: f"{checkpointing}: {m}")


def test_dp2_fsdp_moe_compiled_matches_one_process_eager(tiny_dataset, tmp_path):
    """FSDP2 (its hooks stay outside the compiled forwards) with the MoE layer, two gloo ranks."""
    ref = run_ranks(train_and_report, 1, tiny_dataset, str(tmp_path / "ref"), MOE)[0]
    got = run_ranks(train_and_report, 2, tiny_dataset, str(tmp_path / "dp2"), [*MOE, "train.compile=true"])[0]
    assert ref["losses"][-1] < ref["losses"][0]
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=1e-4, atol=0)
    torch.testing.assert_close(torch.tensor(got["grad_norms"]), torch.tensor(ref["grad_norms"]), rtol=1e-4, atol=0)


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2_sp"])
def test_tp2_moe_compiled_matches_one_process_eager(tiny_dataset, tmp_path, sequence_parallel):
    """DTensor TP blocks and the experts_in_tp layout (its sequence-parallel form too), compiled, with
    per-op checkpointing inside."""
    ref = run_ranks(train_and_report, 1, tiny_dataset, str(tmp_path / "ref"), MOE)[0]
    got = run_ranks(train_and_report, 2, tiny_dataset, str(tmp_path / "tp2"),
                    [*MOE, "parallel.tp=2", "train.compile=true", "train.activation_checkpointing=selective",
                     f"parallel.sequence_parallel={str(sequence_parallel).lower()}"])[0]
    assert ref["losses"][-1] < ref["losses"][0]
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=1e-4, atol=0)
    torch.testing.assert_close(torch.tensor(got["grad_norms"]), torch.tensor(ref["grad_norms"]), rtol=1e-4, atol=0)


def test_pp2_moe_compiled_matches_one_process_eager(tiny_dataset, tmp_path):
    """Compiled blocks inside 1F1B pipeline stages (the 143B config's setting), untied embeddings."""
    base = [*MOE, "model.n_layers=4", "model.tie_embeddings=false"]
    ref = run_ranks(train_and_report, 1, tiny_dataset, str(tmp_path / "ref"), base)[0]
    got = run_ranks(train_and_report, 2, tiny_dataset, str(tmp_path / "pp2"),
                    [*base, "parallel.pp=2", "train.compile=true"])[0]
    assert ref["losses"][-1] < ref["losses"][0]
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=1e-4, atol=0)
    torch.testing.assert_close(torch.tensor(got["grad_norms"]), torch.tensor(ref["grad_norms"]), rtol=1e-4, atol=0)
