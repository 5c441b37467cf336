"""Mixture-of-Experts: router, experts, token dispatchers (local, Pipeline-MoE, all-to-all), the layer."""

from .experts import GroupedExperts
from .layer import MoEFeedForward
from .router import Routing, TopKRouter
from .shape import MoEShape

__all__ = ["GroupedExperts", "MoEFeedForward", "MoEShape", "Routing", "TopKRouter"]
