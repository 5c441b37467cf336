"""Mixture-of-Experts: router, experts, expert layouts (local, experts in TP = Pipeline-MoE, all-to-all), the layer."""

from .experts import GroupedExperts
from .layer import MoEFeedForward
from .layout import ExpertLayout, build_expert_layout
from .router import Routing, TopKRouter
from .shape import MoEShape

__all__ = ["ExpertLayout", "build_expert_layout", "GroupedExperts", "MoEFeedForward", "MoEShape", "Routing", "TopKRouter"]
