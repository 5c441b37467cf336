"""The rules of a growth plan, checked before anything is built: the stage list itself, and between
consecutive stages, that every dimension only grows in a way the operators (ppmoe/growth) can map.

Errors name the key to change. What is allowed but moves the model's function (stacked layers, a
duplicated expert at top-k > 1, a noisy router at top-1) is returned as a warning for the run's log.
"""

from __future__ import annotations

from .loader import ConfigError
from .schema import ExperimentConfig, MoEConfig
from .stages import stage_configs
from .sizes import derived_ffn_hidden

SHARE_TOLERANCE = 1e-6
# Fixed for the whole run: they define the token space, the positions and the norm.
FIXED_MODEL_KEYS = ("vocab_size", "vocab_multiple", "rope_theta", "norm_eps", "tie_embeddings")


def check_growth(cfg: ExperimentConfig) -> list[str]:
    """Check growth.stages (when set); returns warnings. Raises ConfigError on the first broken rule."""
    growth = cfg.growth
    if not growth.stages:
        return []
    check_stage_list(cfg)
    configs = stage_configs(cfg)
    warnings = []
    for index in range(1, len(configs)):
        warnings += check_transition(cfg, index, configs[index - 1], configs[index])
    return warnings


def check_stage_list(cfg: ExperimentConfig) -> None:
    growth, stages = cfg.growth, cfg.growth.stages
    if cfg.patch.size != 1 or cfg.patch.fraction != 0.0:
        raise ConfigError("patch.size / patch.fraction cannot be combined with growth.stages: give the patch "
                          "stages their growth.stages.N.patch_size instead")
    names = [s.name for s in stages]
    for i, stage in enumerate(stages):
        if not stage.name:
            raise ConfigError(f"growth.stages.{i}.name is empty: give every stage a name")
        if names.count(stage.name) > 1:
            raise ConfigError(f"growth.stages.{i}.name={stage.name!r} is used twice; stage names must be unique")
        if not stage.share > 0:
            raise ConfigError(f"growth.stages.{i}.share must be > 0, got {stage.share}")
        if stage.patch_size < 1:
            raise ConfigError(f"growth.stages.{i}.patch_size must be >= 1 (1 = token level), got {stage.patch_size}")
        if i and stage.patch_size > stages[i - 1].patch_size:
            raise ConfigError(f"growth.stages.{i}.patch_size={stage.patch_size} is larger than the previous "
                              f"stage's {stages[i - 1].patch_size}: patch stages come first, K non-increasing")
    total = sum(s.share for s in stages)
    if abs(total - 1.0) > SHARE_TOLERANCE:
        raise ConfigError(f"growth.stages shares sum to {total:g}; they must sum to 1 "
                          f"({', '.join(f'{s.name}: {s.share:g}' for s in stages)})")
    last = len(stages) - 1
    if stages[last].model or stages[last].moe:
        raise ConfigError(f"growth.stages.{last} is the final model: put its model/moe settings in the top-level "
                          f"model and moe sections, not in growth.stages.{last}.model/moe")
    if stages[last].patch_size != 1:
        raise ConfigError(f"growth.stages.{last}.patch_size must be 1: the final stage trains at token level")
    for key, value in (("growth.ops.noise", growth.ops.noise), ("growth.ops.router_std", growth.ops.router_std),
                       ("growth.rewarm_steps", growth.rewarm_steps or 0)):
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")


def ratio(new: int, old: int, key: str, what: str) -> int:
    """new / old as an integer >= 1, or a ConfigError naming `key`."""
    if new < old:
        raise ConfigError(f"{key}={new} is smaller than the previous stage's {old}: growth never shrinks {what}")
    if new % old:
        raise ConfigError(f"{key}={new} is not a whole multiple of the previous stage's {old}: {what} grows "
                          f"by integer factors (tiling and cloning copy whole blocks)")
    return new // old


def renormalises(moe: MoEConfig) -> bool:
    """Whether the router renormalises its top-k weights (it never does at top-1)."""
    return moe.normalize_topk and moe.top_k > 1


def check_transition(cfg: ExperimentConfig, index: int, old: ExperimentConfig, new: ExperimentConfig) -> list[str]:
    """Stage index-1 -> stage index. Keys in messages are those of stage `index` (the last stage's come from
    the top-level sections)."""
    where = key_namer(cfg, index)
    check_fixed(old, new, where)
    if new.train.seq_len < old.train.seq_len:
        raise ConfigError(f"{where('train.seq_len')}={new.train.seq_len} is shorter than the previous stage's "
                          f"{old.train.seq_len}: sequences only grow (the growth probe scores the grown model on "
                          f"the previous stage's sequences)")
    warnings = check_width(cfg, old, new, where)
    warnings += check_depth(cfg, old, new, where)
    ratio(derived_ffn_hidden(new.model), derived_ffn_hidden(old.model), where("model.ffn_hidden"), "the FFN")
    warnings += check_experts(cfg, old, new, where)
    return [f"growth.stages.{index} ({cfg.growth.stages[index].name}): {w}" for w in warnings]


def key_namer(cfg: ExperimentConfig, index: int):
    """section.key -> the key a user edits for stage `index`: growth.stages.N.section.key, except the last
    stage's keys that it does not override, which are the top-level ones (the final model)."""
    stage, last = cfg.growth.stages[index], index == len(cfg.growth.stages) - 1

    def where(key: str) -> str:
        section, name = key.split(".", 1)
        if last and name not in getattr(stage, section):
            return key
        return f"growth.stages.{index}.{key}"
    return where


def check_fixed(old: ExperimentConfig, new: ExperimentConfig, where) -> None:
    for key in FIXED_MODEL_KEYS:
        if getattr(old.model, key) != getattr(new.model, key):
            raise ConfigError(f"{where('model.' + key)}={getattr(new.model, key)} differs from the previous stage's "
                              f"{getattr(old.model, key)}; model.{key} is fixed for the whole run")


def check_width(cfg: ExperimentConfig, old: ExperimentConfig, new: ExperimentConfig, where) -> list[str]:
    """d_model and heads grow together by cloning: head_dim stays, heads and KV heads grow by the same n."""
    n = ratio(new.model.d_model, old.model.d_model, where("model.d_model"), "d_model")
    old_kv, new_kv = old.model.n_kv_heads or old.model.n_heads, new.model.n_kv_heads or new.model.n_heads
    if new.model.n_heads != n * old.model.n_heads or new_kv != n * old_kv:
        raise ConfigError(
            f"{where('model.n_heads')}={new.model.n_heads} and n_kv_heads={new_kv} must be {n}x the previous "
            f"stage's {old.model.n_heads} and {old_kv}: d_model grows {n}x, and heads grow with it so that "
            f"head_dim (d_model / n_heads = {old.model.d_model // old.model.n_heads}) and the rotary frequencies stay")
    if n > 1 and new.model.tie_embeddings:
        raise ConfigError("width growth (model.d_model) needs model.tie_embeddings: false: a cloned residual stream "
                          "wants the input embedding tiled but the output head divided, so one shared table cannot be both")
    return []


def source_layer(index: int, old_layers: int, new_layers: int, mode: str) -> int:
    """The layer of the previous stage that new layer `index` copies (growth.ops.depth): 'stack' i mod L,
    'interpose' and 'identity' i // (L'/L); the same layer when the depth does not change."""
    if new_layers == old_layers:
        return index
    if mode == "stack":
        return index % old_layers
    return index // (new_layers // old_layers)


def is_moe_layer(stage: ExperimentConfig, layer: int) -> bool:
    moe = stage.moe
    return moe.num_experts > 0 and layer % moe.every == moe.every - 1


def check_depth(cfg: ExperimentConfig, old: ExperimentConfig, new: ExperimentConfig, where) -> list[str]:
    old_layers, new_layers = old.model.n_layers, new.model.n_layers
    key = where("model.n_layers")
    if new_layers < old_layers:
        raise ConfigError(f"{key}={new_layers} is smaller than the previous stage's {old_layers}: growth never "
                          f"removes layers")
    if cfg.growth.ops.depth != "stack":
        ratio(new_layers, old_layers, key, f"depth (growth.ops.depth={cfg.growth.ops.depth})")
    for layer in range(new_layers):
        source = source_layer(layer, old_layers, new_layers, cfg.growth.ops.depth)
        if is_moe_layer(old, source) and not is_moe_layer(new, layer):
            raise ConfigError(
                f"{key}={new_layers} with growth.ops.depth={cfg.growth.ops.depth} puts MoE layer {source} of the "
                f"previous stage on dense layer {layer}; an MoE layer cannot become dense: choose n_layers so MoE "
                f"layers land on MoE slots (layers every-1, 2*every-1, ...), e.g. a multiple of moe.every for stack")
    if new_layers > old_layers and cfg.growth.ops.depth != "identity":
        return [f"depth {old_layers} -> {new_layers} by {cfg.growth.ops.depth} is not function-preserving "
                f"(growth.ops.depth=identity is)"]
    return []


def check_experts(cfg: ExperimentConfig, old: ExperimentConfig, new: ExperimentConfig, where) -> list[str]:
    o, n = old.moe, new.moe
    if n.num_experts == 0:
        if o.num_experts > 0:
            raise ConfigError(f"{where('moe.num_experts')}=0 after a stage with {o.num_experts} experts: an MoE "
                              f"model cannot become dense")
        return []
    warnings = []
    if o.num_experts > 0 and o.every != n.every:
        raise ConfigError(f"{where('moe.every')}={n.every} differs from the previous stage's {o.every}; MoE layers "
                          f"keep their places while the model grows")
    if o.shared_expert_hidden and not n.shared_expert_hidden:
        raise ConfigError(f"{where('moe.shared_expert_hidden')}=0 after a stage with a shared expert: it cannot be removed")
    if o.shared_expert_hidden and o.shared_expert_gate != n.shared_expert_gate:
        raise ConfigError(f"{where('moe.shared_expert_gate')}={n.shared_expert_gate} differs from the previous stage's "
                          f"{o.shared_expert_gate}: the shared expert keeps its form while the model grows")
    if o.shared_expert_hidden:
        ratio(n.shared_expert_hidden, o.shared_expert_hidden, where("moe.shared_expert_hidden"), "the shared expert")
    depth = (old.model.n_layers, new.model.n_layers, cfg.growth.ops.depth)
    upcycled = any(is_moe_layer(new, layer) and not is_moe_layer(old, source_layer(layer, *depth))
                   for layer in range(new.model.n_layers))
    new_hidden = n.expert_hidden or derived_ffn_hidden(new.model)
    if upcycled:
        warnings += check_upcycle(cfg, old, new, new_hidden, where)
    if o.num_experts > 0:
        warnings += check_expert_growth(cfg, old, new, new_hidden, where)
    if n.capacity_factor is not None and (upcycled or n.num_experts > o.num_experts):
        warnings.append("moe.capacity_factor drops tokens, so grown experts are not function-preserving "
                        "(a zero or duplicated router sends every token to one expert at first)")
    return warnings


def check_upcycle(cfg: ExperimentConfig, old: ExperimentConfig, new: ExperimentConfig, new_hidden: int, where
                  ) -> list[str]:
    """A dense FFN of the previous stage becomes E copies (sparse upcycling)."""
    dense_hidden = derived_ffn_hidden(old.model)
    if new_hidden % dense_hidden:
        raise ConfigError(f"{where('moe.expert_hidden')}={new_hidden} is not a whole multiple of the dense FFN "
                          f"hidden size {dense_hidden} it is upcycled from; set the dense stage's model.ffn_hidden "
                          f"to a divisor of it")
    if not renormalises(new.moe) and cfg.growth.ops.router_std > 0:
        return [f"upcycling to unnormalised top-{new.moe.top_k} routing is exact only with a zero router "
                f"(growth.ops.router_std: 0); with {cfg.growth.ops.router_std} the function moves"]
    return []


def check_expert_growth(cfg: ExperimentConfig, old: ExperimentConfig, new: ExperimentConfig, new_hidden: int, where
                        ) -> list[str]:
    o, n = old.moe, new.moe
    m = ratio(n.num_experts, o.num_experts, where("moe.num_experts"), "the number of experts")
    old_hidden = o.expert_hidden or derived_ffn_hidden(old.model)
    k_key = where("moe.top_k")
    if m == 1:
        if n.top_k != o.top_k:
            raise ConfigError(f"{k_key}={n.top_k} differs from the previous stage's {o.top_k}; top_k changes only "
                              f"when the experts grow (m*k with growth.ops.experts)")
        ratio(new_hidden, old_hidden, where("moe.expert_hidden"), "the expert hidden size")
        check_renormalisation(o, n, where)
        return []
    if cfg.growth.ops.experts == "split":
        if n.top_k != m * o.top_k:
            raise ConfigError(f"{k_key}={n.top_k} must be {m * o.top_k} (= {m} x {o.top_k}): splitting each expert "
                              f"into {m} needs {m}x the choices per token")
        if old_hidden % m:
            raise ConfigError(f"the previous stage's expert hidden size {old_hidden} does not split into {m} "
                              f"experts ({where('moe.num_experts')}={n.num_experts})")
        ratio(new_hidden, old_hidden // m, where("moe.expert_hidden"), "the split experts' hidden size")
    else:
        if n.top_k not in (o.top_k, m * o.top_k):
            raise ConfigError(f"{k_key}={n.top_k} must be {o.top_k} or {m * o.top_k} when duplicating each expert "
                              f"{m}x")
        ratio(new_hidden, old_hidden, where("moe.expert_hidden"), "the expert hidden size")
    check_renormalisation(o, n, where)
    if cfg.growth.ops.experts == "duplicate" and n.top_k == o.top_k > 1:
        return [f"duplicating experts at fixed top_k={o.top_k} is not function-preserving (copies of the best "
                f"expert crowd out the others); top_k {m * o.top_k} would be"]
    return []


def check_renormalisation(o: MoEConfig, n: MoEConfig, where) -> None:
    """Switching top-k renormalisation on or off rescales every token's output: refused."""
    if renormalises(o) != renormalises(n):
        raise ConfigError(f"{where('moe.top_k')}={n.top_k} with moe.normalize_topk={n.normalize_topk} switches "
                          f"top-k renormalisation {'on' if renormalises(n) else 'off'} (it is "
                          f"{'on' if renormalises(o) else 'off'} at top_k={o.top_k}), which changes every token's "
                          f"output; set {where('moe.normalize_topk')}: {str(renormalises(o)).lower()}")
