"""Expert growth (growth.ops.experts) and upcycling a dense FFN into experts.

The MoE output is y = sum over the top-k experts of w_e * FFN_e(x), with w = p (softmax over E) or
w = p / sum_top p when top-k renormalisation is on: rho = normalize_topk and top_k > 1.

E -> m*E experts, k -> k' choices:
- 'duplicate': experts and gate rows tiled (new expert c*E + e is old e), so each copy gets p/m.
  k' = m*k: the m copies of each old top-k expert are chosen, w2 x1: exact iff rho(old) == rho(new)
  (m times the active FLOPs). k' = k = 1: one copy gets p/m, w2 x m: exact. k' = k > 1: copies of the
  best expert crowd out the others: NOT exact (w2 x m without renormalisation, x1 with). Other k': refused.
- 'split': each expert's hidden units cut into m fine-grained experts (new e*m + c = hidden slice c of old
  e), gate rows repeated in place, k' = m*k, w2 x m: the m slices of each old top-k expert are chosen
  with p/m each and sum to FFN_e (SwiGLU is elementwise over hidden units). Exact iff rho(old) ==
  rho(new), same FLOPs. Needs the expert hidden size divisible by m.
- m = 1: nothing, and k' must equal k (exact iff rho is unchanged).
Ties between the k-th and (k+1)-th old experts may break differently (a measure-zero event), and a
capacity limit drops different tokens (ceil(cf*T*k/E) changes): exactness is for dropless routing.

Upcycling (a dense FFN [f hidden] under a new MoE slot of E experts, top k'): every expert is a copy of
the FFN (experts.w1[e] = w1.weight.T, w3 likewise, experts.w2[e] = w2.weight.T), the router is new
(normal(0, growth.ops.router_std), zeros when 0). With rho(new) the chosen weights sum to 1: exact for
any router, w2 x1. Without it, w2 x E/k' is exact only for a zero router (p = 1/E for every expert);
otherwise the output is off by a factor of about E * p_max: NOT exact.

A shared expert is grown like a dense FFN (hidden tiling); a new one (none before) starts with w1, w3
normal(0, init_std) and w2 = 0: it adds 0, exact.

Gradient scales (the optimizer-moment transform) are approximate for experts: they are those of a copy
that receives the tokens (a copy that loses them gets none), and the gate's are taken as unchanged.
"""

from __future__ import annotations

from ..moe.shape import MoEShape
from .recipe import (ChopIntoExperts, NewAxis, Recipe, RepeatEach, Tile, Transpose, fresh, inexact, noted, scaled,
                     with_steps)

ROUTER = "feed_forward.router.gate.weight"
EXPERT_W2 = "feed_forward.experts.w2"
EXPERT_INPUTS = ("feed_forward.experts.w1", "feed_forward.experts.w3")

UPCYCLE_SOURCES = {
    # expert tensor [E, ...] <- dense tensor of the source layer (transposed: experts store [in, out])
    "feed_forward.experts.w1": "feed_forward.w1.weight",  # [E, d, f] <- [f, d]
    "feed_forward.experts.w3": "feed_forward.w3.weight",  # [E, d, f] <- [f, d]
    "feed_forward.experts.w2": "feed_forward.w2.weight",  # [E, f, d] <- [d, f]
}

EXPERTS_HIDDEN_AXIS = {"feed_forward.experts.w1": 2, "feed_forward.experts.w3": 2, "feed_forward.experts.w2": 1}

RHO_CHANGED = "top-k renormalisation (normalize_topk and top_k > 1) differs between the old and new router"
CROWDED_OUT = "duplicated experts at a fixed top_k > 1: copies of the best expert crowd out the others"


def renormalised(moe: MoEShape) -> bool:
    """rho: whether the router renormalises its top-k weights to sum to 1."""
    return moe.normalize_topk and moe.top_k > 1


def expert_factor(old: MoEShape, new: MoEShape) -> int:
    """m = E'/E; ValueError unless a positive integer."""
    if new.num_experts < old.num_experts or new.num_experts % old.num_experts:
        raise ValueError(f"moe.num_experts {old.num_experts} -> {new.num_experts}: expert growth needs an "
                         f"integer ratio >= 1")
    return new.num_experts // old.num_experts


def check_experts(old: MoEShape, new: MoEShape, mode: str) -> int:
    """Validate E -> E', k -> k' for `mode`; returns m."""
    m = expert_factor(old, new)
    k, k2 = old.top_k, new.top_k
    if m == 1:
        if k2 != k:
            raise ValueError(f"moe.top_k {k} -> {k2} with moe.num_experts unchanged ({old.num_experts}): no "
                             f"operator maps this (top_k grows only with the experts)")
        return m
    if mode == "split":
        if k2 != m * k:
            raise ValueError(f"moe.top_k {k} -> {k2}: experts 'split' x{m} needs top_k {m * k}")
        if old.expert_hidden % m:
            raise ValueError(f"moe.expert_hidden {old.expert_hidden} is not divisible by {m}: experts 'split' "
                             f"cuts each expert into {m}")
    elif mode == "duplicate":
        if k2 not in (k, m * k):
            raise ValueError(f"moe.top_k {k} -> {k2}: experts 'duplicate' x{m} needs top_k {k} or {m * k}")
    else:
        raise ValueError(f"growth.ops.experts={mode!r}; choose duplicate or split")
    return m


def hidden_after_experts(old: MoEShape, new: MoEShape, mode: str) -> int:
    """Each expert's hidden size once the experts operator has run (before hidden tiling)."""
    m = expert_factor(old, new)
    return old.expert_hidden // m if mode == "split" and m > 1 else old.expert_hidden


def grow_experts(recipe: Recipe, name: str, old: MoEShape, new: MoEShape, mode: str) -> Recipe:
    """The experts operator on router or expert tensor `name` of an MoE layer whose source is MoE."""
    m = check_experts(old, new, mode)
    k, k2 = old.top_k, new.top_k
    same_rho = renormalised(old) == renormalised(new)
    if m == 1:
        return recipe if same_rho or name != EXPERT_W2 else inexact(recipe, RHO_CHANGED)
    if mode == "split":
        if name == ROUTER:
            return noted(with_steps(recipe, RepeatEach(0, m)), f"router rows repeated x{m}")
        recipe = noted(with_steps(recipe, ChopIntoExperts(EXPERTS_HIDDEN_AXIS[name], m)), f"experts split x{m}")
        if name != EXPERT_W2:
            return recipe
        recipe = scaled(recipe, float(m), 1.0 / m)
        return recipe if same_rho else inexact(recipe, RHO_CHANGED)
    recipe = with_steps(recipe, Tile(0, m))
    if name == ROUTER:
        return noted(recipe, f"router rows tiled x{m}")
    recipe = noted(recipe, f"experts duplicate x{m}")
    if k2 == m * k:  # every copy of the chosen experts is chosen, each with p/m
        recipe = scaled(recipe, 1.0, 1.0 / m)
        if name != EXPERT_W2:
            return recipe
        return recipe if same_rho else inexact(recipe, RHO_CHANGED)
    if name != EXPERT_W2:
        return recipe
    if k == 1:  # one copy is chosen with p/m
        return scaled(recipe, float(m), 1.0 / m)
    recipe = scaled(recipe, 1.0 if renormalised(new) else float(m), 1.0 / m)
    return inexact(recipe, CROWDED_OUT)


def upcycle(recipe: Recipe, name: str, new: MoEShape, router_std: float) -> Recipe:
    """Dense FFN tensor (recipe of UPCYCLE_SOURCES[name]) -> expert tensor `name`, one copy per expert."""
    experts, k = new.num_experts, new.top_k
    recipe = noted(with_steps(recipe, Transpose(0, 1), NewAxis(0, experts)), f"upcycled into {experts} experts")
    if name != EXPERT_W2:
        return scaled(recipe, 1.0, 1.0 / k)
    if renormalised(new):  # the chosen weights sum to 1 whatever the router says
        return scaled(recipe, 1.0, 1.0 / k)
    # Without renormalisation the k chosen weights are k/E for a zero router.
    recipe = noted(scaled(recipe, experts / k, 1.0 / experts), f"w2 x{experts}/{k}")
    if router_std > 0:
        recipe = inexact(recipe, "upcycling without top-k renormalisation and a random router "
                                 "(growth.ops.router_std > 0): output off by about |E * p_max - 1|")
    return recipe


def new_router(shape: tuple[int, ...], router_std: float) -> Recipe:
    """A router gate [E, d] for an upcycled layer: normal(0, router_std), zeros when 0."""
    return fresh(shape, router_std, 1.0, f"new router, normal(0, {router_std})")


def new_shared_expert(name: str, shape: tuple[int, ...], init_std: float) -> Recipe:
    """A shared expert where there was none: w1, w3 normal(0, init_std), w2 zeros, so it adds 0 (exact)."""
    if name.endswith("w2.weight"):
        return fresh(shape, 0.0, 0.0, "new shared expert, zero output projection")
    return fresh(shape, init_std, 1.0, f"new shared expert, normal(0, {init_std})")
