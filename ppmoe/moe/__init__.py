"""Mixture-of-Experts: router, experts, token dispatchers (local, Pipeline-MoE, all-to-all), the layer."""

from .experts import GroupedExperts
from .layer import MoEFeedForward, MoEShape
from .router import Routing, TopKRouter

__all__ = ["GroupedExperts", "MoEFeedForward", "MoEShape", "Routing", "TopKRouter"]
