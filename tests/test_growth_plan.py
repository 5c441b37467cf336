"""The growth plan: stage configs from partial overrides, shares -> steps (FLOPs, tokens, steps), the
learning-rate schedules, and every growth rule refused before anything is built, with the key to change."""

import pytest

from ppmoe.config import ConfigError, check_growth, load_config, stage_configs, validate
from ppmoe.model import count_parameters
from ppmoe.train.plan import build_stage_plan

VOCAB = 300
FINAL = ["model.n_layers=4", "model.d_model=64", "model.n_heads=8", "model.n_kv_heads=4", "model.ffn_hidden=128",
         "train.steps=100", "train.warmup_steps=10", "train.global_batch_size=8", "train.micro_batch_size=2"]
SMALL = "{n_layers: 2, d_model: 32, n_heads: 4, n_kv_heads: 2, ffn_hidden: 64}"


def growth_cfg(*extra, small=SMALL, shares=(0.25, 0.75)):
    stages = ["growth.stages.0.name=small", f"growth.stages.0.share={shares[0]}", f"growth.stages.0.model={small}",
              "growth.stages.1.name=full", f"growth.stages.1.share={shares[1]}"]
    return load_config(None, [*FINAL, *stages, *extra])


def test_stage_configs_apply_partial_overrides_to_the_final_model():
    small, full = stage_configs(growth_cfg("growth.stages.0.train={lr: 0.01, seq_len: 64}",
                                           "growth.stages.0.parallel={tp: 2}"))
    assert (small.model.n_layers, small.model.d_model, small.model.n_heads) == (2, 32, 4)
    assert (small.train.lr, small.train.seq_len, small.parallel.tp) == (0.01, 64, 2)
    assert small.train.steps == full.train.steps == 100  # not a stage setting
    assert (full.model.d_model, full.train.seq_len, full.parallel.tp) == (64, 128, 1)
    assert not small.growth.stages and not full.growth.stages  # each stage is a plain run


def test_flops_split_gives_equal_flops_to_the_full_size_baseline():
    cfg = growth_cfg()
    plan = build_stage_plan(cfg, VOCAB)
    small, full = plan.stages
    baseline = build_stage_plan(load_config(None, FINAL), VOCAB).stages[0]
    assert small.flops_per_step < full.flops_per_step / 3  # the small model is much cheaper per step
    spent = small.steps * small.flops_per_step + full.steps * full.flops_per_step
    assert spent == pytest.approx(100 * baseline.flops_per_step, rel=full.flops_per_step / spent)  # +- a step
    assert small.steps * small.flops_per_step == pytest.approx(0.25 * spent, rel=0.02)
    assert small.steps > 25 and full.steps == pytest.approx(75, abs=1)
    assert (small.start, small.end, full.start, full.end) == (0, small.steps, small.steps, plan.total_steps)
    assert full.grows and not small.grows and full.reset_optimizer
    assert count_parameters(full.shape) > 3 * count_parameters(small.shape)


def test_tokens_and_steps_splits():
    steps = build_stage_plan(growth_cfg("growth.split=steps"), VOCAB)
    assert [s.steps for s in steps.stages] == [25, 75]
    tokens = build_stage_plan(growth_cfg("growth.split=tokens", "growth.stages.0.patch_size=4"), VOCAB)
    patch, full = tokens.stages
    assert patch.tokens_per_step == 4 * full.tokens_per_step
    assert abs(patch.steps * patch.tokens_per_step - 0.25 * 100 * full.tokens_per_step) <= patch.tokens_per_step / 2
    assert patch.phase == "patch" and full.phase == "token" and tokens.chunked_data
    assert not steps.chunked_data  # one window length: the ordinary data order


def test_global_schedule_rewarms_after_a_growth_and_per_stage_restarts():
    plan = build_stage_plan(growth_cfg("growth.split=steps", "growth.schedule=global", "growth.rewarm_steps=5"),
                            VOCAB)
    cfg = growth_cfg()
    assert plan.lr(10) == pytest.approx(cfg.train.lr)  # the run's warmup
    boundary = plan.stages[1].start
    unramped = build_stage_plan(growth_cfg("growth.split=steps", "growth.schedule=global", "growth.rewarm_steps=0"),
                                VOCAB)
    assert plan.lr(boundary) == pytest.approx(unramped.lr(boundary))  # the small stage's last step
    assert plan.lr(boundary + 1) == pytest.approx(unramped.lr(boundary + 1) / 5)  # fresh optimizer: ramp
    assert plan.lr(boundary + 5) == pytest.approx(unramped.lr(boundary + 5))
    assert plan.lr(100) == pytest.approx(cfg.train.min_lr)  # one cosine, fully decayed at the budget
    per_stage = build_stage_plan(growth_cfg("growth.split=steps"), VOCAB)  # the default
    assert per_stage.lr(25) == pytest.approx(cfg.train.min_lr) and per_stage.lr(35) == pytest.approx(cfg.train.lr)


def test_transform_keeps_the_optimizer_and_a_plain_run_is_one_stage():
    plan = build_stage_plan(growth_cfg("growth.optimizer=transform"), VOCAB)
    assert not plan.stages[1].reset_optimizer
    single = build_stage_plan(load_config(None, FINAL), VOCAB)
    assert [(s.name, s.steps, s.phase) for s in single.stages] == [("main", 100, "token")]


def test_a_share_too_small_for_one_step_is_refused():
    with pytest.raises(ConfigError, match=r"growth.stages.0 \(small\) gets 0 steps"):
        build_stage_plan(growth_cfg("growth.split=steps", shares=(0.001, 0.999)), VOCAB)


def test_allowed_but_inexact_growth_is_reported():
    notes = check_growth(growth_cfg("growth.ops.depth=stack"))
    assert any("not function-preserving" in n and "stack" in n for n in notes)
    assert not check_growth(growth_cfg("growth.ops.depth=identity"))


MOE = ["moe.num_experts=4", "moe.every=2", "moe.expert_hidden=128"]
REFUSED = {
    "shrinks d_model": (["growth.stages.0.model={d_model: 128, n_heads: 16, n_kv_heads: 8}"],
                        "model.d_model=64 is smaller than the previous stage's 128"),
    "non-integer width": (["growth.stages.0.model={d_model: 48, n_heads: 6, n_kv_heads: 3}"],
                          "model.d_model=64 is not a whole multiple of the previous stage's 48"),
    "heads change head_dim": (["growth.stages.0.model={d_model: 32, n_heads: 8, n_kv_heads: 4}"],
                              "model.n_heads=8 .* must be 2x .* head_dim"),
    "tied embeddings with width": (["model.tie_embeddings=true"], "tie_embeddings: false"),
    "non-integer FFN": (["growth.stages.0.model={n_layers: 2, d_model: 32, n_heads: 4, n_kv_heads: 2, "
                         "ffn_hidden: 96}"], "model.ffn_hidden=128 is not a whole multiple"),
    "fewer layers": (["growth.stages.0.model={n_layers: 8}"], "model.n_layers=4 is smaller"),
    "interpose needs an integer ratio": (["growth.ops.depth=interpose",
                                          "growth.stages.0.model={n_layers: 3}"], "model.n_layers=4 is not a whole"),
    "vocab changes": (["growth.stages.0.model={vocab_size: 256}"], "vocab_size is fixed"),
    "shares do not sum to 1": ([], "shares sum to 0.9"),
    "last stage overrides the model": (["growth.stages.1.model={d_model: 64}"], "top-level model and moe"),
    "patch stage after a token stage": (["growth.stages.1.patch_size=2"], "patch_size=2 is larger|must be 1"),
    "patch.* with growth": (["patch.size=4", "patch.fraction=0.5"], "growth.stages.N.patch_size"),
    "unknown stage key": (["growth.stages.0.model={d_modle: 32}"], "growth.stages.0.model.d_modle"),
    "a run-wide train key per stage": (["growth.stages.0.train={steps: 10}"], "growth.stages.0.train.steps cannot"),
    "shorter sequences later": (["growth.stages.0.train={seq_len: 256}"], "seq_len=128 is shorter"),
    "experts not divisible by tp after growth": ([*MOE, "moe.num_experts=6", "parallel.tp=4",
                                                  "growth.stages.0.parallel={tp: 2}",
                                                  "growth.stages.0.moe={num_experts: 0}"],
                                                 "num_experts=6 is not divisible by parallel.tp=4"),
    "MoE to dense": ([*MOE, "growth.stages.0.moe={num_experts: 4}", "moe.num_experts=0"], "cannot become dense"),
    "split without m*k": ([*MOE, "growth.ops.experts=split", "moe.num_experts=8",
                           "growth.stages.0.moe={num_experts: 4, expert_hidden: 128}"], "top_k=1 must be 2"),
    "top-1 -> top-2 switches renormalisation on": ([*MOE, "growth.ops.experts=split", "moe.num_experts=8",
                                                    "moe.top_k=2", "moe.expert_hidden=64",
                                                    "growth.stages.0.moe={num_experts: 4, top_k: 1, "
                                                    "expert_hidden: 128}"], "normalize_topk: false"),
    "upcycle hidden not a multiple": ([*MOE, "moe.expert_hidden=96", "growth.stages.0.moe={num_experts: 0}"],
                                      "expert_hidden=96 is not a whole multiple of the dense FFN hidden size 64"),
    "stacking MoE onto a dense slot": ([*MOE, "growth.stages.0.moe={num_experts: 4}",
                                        "growth.stages.0.model={n_layers: 3, d_model: 32, n_heads: 4, "
                                        "n_kv_heads: 2, ffn_hidden: 64}", "model.n_layers=5"],
                                       "MoE layer 1 of the previous stage on dense layer"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_bad_growth_config_is_refused_naming_the_key(case):
    extra, message = REFUSED[case]
    shares = (0.3, 0.6) if case == "shares do not sum to 1" else (0.25, 0.75)
    with pytest.raises(ConfigError, match=message):
        validate(growth_cfg(*extra, shares=shares), 4 if "tp" in case else 1)
