"""transformers interop: checkpoints (saved at one process, tp=2 and pp=2) exported and loaded with
AutoModelForCausalLM give ppmoe's logits; the exported tokenizer encodes as ppmoe's; a transformers
model imported and exported again gives back its tensors, and a run started from it (train.init_from)
has the transformers model's loss at its first step; models no architecture represents are refused.

Tolerance: fp32 logits, max |ppmoe - transformers| <= 2e-5 (measured ~5e-6 on logits of magnitude ~10: the
two differ only in the order of floating-point sums, e.g. RMSNorm and SDPA kernels)."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, MixtralConfig,
                          MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM)

from multiproc import run_ranks
from ppmoe.cli import main
from ppmoe.config import save_config
from ppmoe.data import BatchLoader, load_tokenizer
from ppmoe.interop.architectures import ExportRefused, choose_architecture
from ppmoe.interop.checkpoint_source import open_checkpoint
from ppmoe.interop.export import export_checkpoint
from ppmoe.interop.import_hf import import_model
from ppmoe.interop.safetensors_files import read_safetensors
from ppmoe.interop.weights import ImportRefused
from ppmoe.model import build_model
from ppmoe.model.gpt import GPTShape
from ppmoe.moe.shape import MoEShape
from ppmoe.train.checkpoint import CheckpointManager
from test_parallel_equivalence import tiny_config

LOGIT_ATOL = 2e-5
MOE = ["moe.num_experts=4", "moe.top_k=2"]
VARIANTS = {
    # name: (config overrides, world size, the architecture auto-export must choose)
    "dense_tied": (["model.tie_embeddings=true", "model.n_kv_heads=4"], 1, "llama"),
    "gqa_untied": ([], 1, "llama"),
    "moe_every_layer_top2": (MOE, 1, "mixtral"),
    "moe_every_2_shared": ([*MOE, "model.n_layers=4", "moe.every=2", "moe.shared_expert_hidden=32",
                            "moe.shared_expert_gate=true"], 1, "qwen2_moe"),
    "moe_shared_tp2": ([*MOE, "model.n_layers=4", "moe.every=2", "moe.shared_expert_hidden=32",
                        "moe.shared_expert_gate=true", "parallel.tp=2"], 2, "qwen2_moe"),
    "moe_pp2": ([*MOE, "model.n_layers=4", "parallel.pp=2"], 2, "mixtral"),
    "dense_pp2": (["model.n_layers=4", "parallel.pp=2"], 2, "llama"),
}
TEXT = "the king shall speak: sweet lady, what night? Thou hath 42 swords\nnoble heart."


def train(dataset_dir, output_dir, overrides):
    from ppmoe.train import Trainer

    return Trainer(tiny_config(dataset_dir, output_dir, ["train.steps=3", "checkpoint.save_final=true",
                                                          *overrides])).fit().last_step


@pytest.fixture(scope="module")
def trained(tiny_dataset, tmp_path_factory):
    """{variant: run directory} of short runs that end with a checkpoint."""
    runs = {}
    for name, (overrides, world, _) in VARIANTS.items():
        out = tmp_path_factory.mktemp(name)
        assert run_ranks(train, world, tiny_dataset, str(out), overrides)[0] == 3
        runs[name] = out
    return runs


def reference_logits(checkpoint: Path, tokens: torch.Tensor) -> torch.Tensor:
    """ppmoe's logits from the checkpoint, loaded the way the trainer loads it (DCP into the module)."""
    record = open_checkpoint(checkpoint).record
    model = build_model(record.shape, seed=99)
    before = model.norm.weight.clone()
    CheckpointManager(checkpoint.parent, 0, 0).load_weights(checkpoint, model)
    assert not torch.equal(model.norm.weight, before)  # trained weights arrived (norm gains start at 1)
    with torch.no_grad():
        return model.eval()(tokens)[..., :record.vocab_size]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_export_loads_in_transformers_with_equal_logits(variant, trained, tiny_dataset, tmp_path):
    run = trained[variant]
    out = tmp_path / "hf"
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert hf.config.model_type == VARIANTS[variant][2]
    ours = load_tokenizer(Path(tiny_dataset) / "tokenizer.json")
    ids = ours.encode(TEXT).ids
    assert AutoTokenizer.from_pretrained(out)(TEXT)["input_ids"] == ids
    tokens = torch.tensor([ids[:16], ids[16:32]])
    with torch.no_grad():
        theirs = hf(tokens).logits
    expected = reference_logits(open_checkpoint(run).path, tokens)
    assert theirs.shape == expected.shape  # padded vocabulary rows dropped: 300 of 384
    assert (theirs - expected).abs().max().item() <= LOGIT_ATOL


def test_export_shards_large_models(trained, tmp_path):
    source = open_checkpoint(trained["gqa_untied"])
    export_checkpoint(source, tmp_path / "hf", max_shard_bytes=20_000, log=lambda _: None)
    names = {p.name for p in (tmp_path / "hf").iterdir()}
    assert "model.safetensors.index.json" in names and "model.safetensors" not in names
    assert len([n for n in names if n.endswith(".safetensors")]) > 2
    one = tmp_path / "one"
    export_checkpoint(source, one, log=lambda _: None)
    sharded, single = read_safetensors(tmp_path / "hf"), read_safetensors(one)
    assert sharded.keys() == single.keys() and all(torch.equal(sharded[k], single[k]) for k in single)
    AutoModelForCausalLM.from_pretrained(tmp_path / "hf")


def shape(**moe) -> GPTShape:
    return GPTShape(n_layers=2, d_model=32, n_heads=4, n_kv_heads=4, ffn_hidden=64, vocab_size=128, max_seq_len=16,
                    moe=MoEShape(num_experts=4, expert_hidden=64, **moe) if moe else None)


@pytest.mark.parametrize("arch, moe, words", [
    ("mixtral", {"top_k": 1}, "top-1 routing"),
    ("mixtral", {"top_k": 2, "normalize_topk": False}, "always renormalises"),
    ("mixtral", {"top_k": 2, "every": 2}, "moe.every=2"),
    ("llama", {"top_k": 2}, "Llama is dense"),
    ("qwen2_moe", {"top_k": 2, "shared_expert_hidden": 32}, "moe.shared_expert_gate: true"),
    ("gpt2", {"top_k": 2}, "choose auto or one of"),
])
def test_inexact_exports_are_refused_with_the_reason(arch, moe, words):
    with pytest.raises(ExportRefused, match=words):
        choose_architecture(shape(**moe), arch)


def test_auto_export_of_top1_is_qwen2_moe_without_renormalisation():
    assert choose_architecture(shape(top_k=1)) == "qwen2_moe"
    with pytest.raises(ExportRefused, match="no transformers architecture"):
        choose_architecture(shape(top_k=2, shared_expert_hidden=32))


def test_refused_export_on_the_command_line_writes_nothing(trained, tmp_path, capsys):
    out = tmp_path / "hf"
    assert main(["export", str(trained["moe_every_layer_top2"]), "--out", str(out), "--arch", "llama"]) == 2
    assert "cannot export to llama exactly" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "hf.tmp").exists()


# ---- import --------------------------------------------------------------------------------------------

HF_MODELS = {
    "llama": (lambda: LlamaForCausalLM(LlamaConfig(
        vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, tie_word_embeddings=False, eos_token_id=0)),
        []),
    "mixtral": (lambda: MixtralForCausalLM(MixtralConfig(
        vocab_size=384, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, rms_norm_eps=1e-5, rope_theta=10000.0)),
        ["moe.num_experts=4", "moe.top_k=2", "moe.expert_hidden=48"]),
    "qwen2_moe": (lambda: Qwen2MoeForCausalLM(Qwen2MoeConfig(
        vocab_size=384, hidden_size=32, intermediate_size=64, moe_intermediate_size=48,
        shared_expert_intermediate_size=40, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        num_experts=4, num_experts_per_tok=2, decoder_sparse_step=2, norm_topk_prob=False, qkv_bias=False,
        rms_norm_eps=1e-5)),
        ["model.n_layers=4", "moe.num_experts=4", "moe.top_k=2", "moe.expert_hidden=48", "moe.every=2",
         "moe.shared_expert_hidden=40", "moe.shared_expert_gate=true", "moe.normalize_topk=false"]),
}


def random_hf_model(arch: str, directory: Path):
    torch.manual_seed(0)
    model = HF_MODELS[arch][0]()
    with torch.no_grad():  # transformers initialises norms to 1 and some weights to 0: make every one count
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    model.save_pretrained(directory)
    return model.eval()


@pytest.mark.parametrize("arch", list(HF_MODELS))
def test_import_then_export_gives_back_the_tensors(arch, tiny_dataset, tmp_path):
    random_hf_model(arch, tmp_path / "hf")
    cfg = tiny_config(tiny_dataset, tmp_path / "run", HF_MODELS[arch][1])
    import_model(tmp_path / "hf", cfg, tmp_path / "imported")
    export_checkpoint(open_checkpoint(tmp_path / "imported"), tmp_path / "again",
                      tokenizer=Path(tiny_dataset) / "tokenizer.json", log=lambda _: None)
    before, after = read_safetensors(tmp_path / "hf"), read_safetensors(tmp_path / "again")
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name
    for name in set(after) - set(before):  # what ppmoe adds to the hub form: Qwen2-MoE's zero q/k/v biases
        assert name.endswith("_proj.bias") and not after[name].any(), name


@pytest.mark.parametrize("arch", ["llama", "qwen2_moe"])
def test_a_run_from_an_imported_model_starts_at_its_loss(arch, tiny_dataset, tmp_path):
    hf = random_hf_model(arch, tmp_path / "hf")
    overrides = [*HF_MODELS[arch][1], "train.steps=2"]
    save_config(tiny_config(tiny_dataset, tmp_path / "run", overrides), tmp_path / "config.yaml")
    assert main(["import", str(tmp_path / "hf"), "--config", str(tmp_path / "config.yaml"),
                 "--out", str(tmp_path / "imported")]) == 0
    cfg = tiny_config(tiny_dataset, tmp_path / "run", [*overrides, f"train.init_from={tmp_path / 'imported'}"])
    t = cfg.train
    x, y = BatchLoader(tiny_dataset, "train", t.seq_len, t.global_batch_size, 0, 1, t.seed).next_batch()
    with torch.no_grad():
        expected = F.cross_entropy(hf(x).logits.flatten(0, 1), y.flatten()).item()
    loss = run_ranks(first_loss, 2, cfg)[0]  # at dp=2: the import loads at any layout
    assert loss == pytest.approx(expected, abs=1e-5)


def first_loss(cfg):
    from ppmoe.train import Trainer

    return Trainer(cfg).fit().losses[1]


def test_import_names_what_the_config_gets_wrong(tiny_dataset, tmp_path):
    random_hf_model("qwen2_moe", tmp_path / "hf")
    wrong = [o for o in HF_MODELS["qwen2_moe"][1] if not o.startswith("moe.every")] + ["moe.every=1"]
    with pytest.raises(ImportRefused, match="moe.every: 2 -> 1"):
        import_model(tmp_path / "hf", tiny_config(tiny_dataset, tmp_path / "run", wrong), tmp_path / "out")
    with pytest.raises(ImportRefused, match="model.vocab_multiple"):
        import_model(tmp_path / "hf", tiny_config(tiny_dataset, tmp_path / "run", [
            *HF_MODELS["qwen2_moe"][1], "model.vocab_size=400"]), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_biased_attention_is_refused(tiny_dataset, tmp_path):
    model = Qwen2MoeForCausalLM(Qwen2MoeConfig(
        vocab_size=384, hidden_size=32, intermediate_size=64, moe_intermediate_size=48,
        shared_expert_intermediate_size=40, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        num_experts=4, num_experts_per_tok=2, decoder_sparse_step=2, qkv_bias=True, rms_norm_eps=1e-5))
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.bias.fill_(0.1)
    model.save_pretrained(tmp_path / "hf")
    with pytest.raises(ImportRefused, match="q_proj.bias is not zero"):
        import_model(tmp_path / "hf", tiny_config(tiny_dataset, tmp_path / "run", HF_MODELS["qwen2_moe"][1]),
                     tmp_path / "out")


def test_resuming_from_an_imported_checkpoint_says_init_from(tiny_dataset, tmp_path):
    random_hf_model("llama", tmp_path / "hf")
    import_model(tmp_path / "hf", tiny_config(tiny_dataset, tmp_path / "run"), tmp_path / "imported")
    from ppmoe.train.checkpoint import resume_path_problem
    assert "train.init_from=" in resume_path_problem(tmp_path / "imported")


def test_init_from_another_model_is_refused_before_training(tiny_dataset, tmp_path):
    from ppmoe.train import Trainer

    random_hf_model("llama", tmp_path / "hf")
    import_model(tmp_path / "hf", tiny_config(tiny_dataset, tmp_path / "run"), tmp_path / "imported")
    cfg = tiny_config(tiny_dataset, tmp_path / "run2", ["model.n_layers=3", f"train.init_from={tmp_path / 'imported'}"])
    with pytest.raises(RuntimeError, match=r"CheckpointError: train.init_from: .*model.n_layers: 2 -> 3"):
        run_ranks(Trainer, 1, cfg)  # (the rank's error comes back wrapped, with its traceback)


def test_export_overwrite_replaces_only_when_asked(trained, tmp_path, capsys):
    out = tmp_path / "hf"
    assert main(["export", str(trained["gqa_untied"]), "--out", str(out)]) == 0
    assert main(["export", str(trained["gqa_untied"]), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", str(trained["dense_tied"]), "--out", str(out), "--overwrite"]) == 0
    assert AutoModelForCausalLM.from_pretrained(out).config.tie_word_embeddings


def test_an_older_checkpoint_is_described_from_its_run_config(trained):
    """Checkpoints written before model.json: the run's config.yaml, dataset and trainer state say the same."""
    from ppmoe.interop.checkpoint_source import describe_from_run

    for name in ("moe_every_2_shared", "dense_pp2"):
        source = open_checkpoint(trained[name])
        record, tokenizer = describe_from_run(source.path, None)
        assert record == source.record
        assert tokenizer.read_bytes() == source.tokenizer.read_bytes()


# ---- generation ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["dense_tied", "moe_every_2_shared"])
def test_greedy_generation_equals_transformers_generate(variant, trained, tiny_dataset, tmp_path):
    from ppmoe.inference import generate
    from ppmoe.inference.from_checkpoint import load_for_generation

    source = open_checkpoint(trained[variant])
    export_checkpoint(source, tmp_path / "hf", log=lambda _: None)
    prompt = load_tokenizer(source.tokenizer).encode("the king shall").ids[:3]  # (max_seq_len is 16)
    model = load_for_generation(source, torch.device("cpu"))
    cached = generate(model, prompt, 13, temperature=0, eos_id=source.record.eos_id, vocab_size=300)
    assert cached == generate(model, prompt, 13, temperature=0, eos_id=source.record.eos_id, vocab_size=300,
                              use_cache=False)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=13, do_sample=False)[0, len(prompt):].tolist()
    assert len(cached) >= 5, cached  # a comparison worth making (no early end of document)
    assert theirs[:len(cached)] == cached


def test_generate_command_prints_the_continued_prompt(trained, capsys):
    assert main(["generate", str(trained["gqa_untied"]), "--prompt", "the king", "--max-new-tokens", "8",
                 "--seed", "3"]) == 0
    first = capsys.readouterr().out
    assert first.startswith("the king") and len(first) > len("the king\n")
    assert main(["generate", str(trained["gqa_untied"]), "--prompt", "the king", "--max-new-tokens", "8",
                 "--seed", "3"]) == 0
    assert capsys.readouterr().out == first  # seeded: the same sample
    assert main(["generate", str(trained["gqa_untied"]), "--prompt", "the king", "--max-new-tokens", "100"]) == 2
    assert "lower --max-new-tokens" in capsys.readouterr().err


def test_an_imported_dense_model_grows_into_an_moe_model(tiny_dataset, tmp_path):
    """Upcycling a model one already has: import a Llama as the first (dense) stage of a growth plan whose
    next stage is an MoE model; the run starts at the Llama's loss and ends with an MoE checkpoint."""
    hf = random_hf_model("llama", tmp_path / "hf")
    import_model(tmp_path / "hf", tiny_config(tiny_dataset, tmp_path / "run"), tmp_path / "imported")
    cfg = tiny_config(tiny_dataset, tmp_path / "run", [
        "moe.num_experts=4", "moe.top_k=2", "train.steps=4", "checkpoint.save_final=true",
        "growth.stages=[{name: dense, share: 0.5, moe: {num_experts: 0}}, {name: moe, share: 0.5}]",
        f"train.init_from={tmp_path / 'imported'}"])
    t = cfg.train
    x, y = BatchLoader(tiny_dataset, "train", t.seq_len, t.global_batch_size, 0, 1, t.seed).next_batch()
    with torch.no_grad():
        expected = F.cross_entropy(hf(x).logits.flatten(0, 1), y.flatten()).item()
    assert run_ranks(first_loss, 2, cfg)[0] == pytest.approx(expected, abs=1e-5)
    record = open_checkpoint(tmp_path / "run").record
    assert record.stage == "moe" and record.shape.moe.num_experts == 4
