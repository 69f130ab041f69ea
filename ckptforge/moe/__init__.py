"""Runtime MoE layers: routers, stacked experts and the MoE feed-forward blocks.

This package knows nothing of conversion. Its modules import only torch and transformers, and use
relative imports among themselves, because they are copied next to ``modeling_*.py`` files as
remote code.
"""

from .experts import StackedExperts
from .layer import ROUTER_TYPES, MoEFeedForward, active_expert_params, build_moe_layer, moe_tensor_layout
from .multihead import MultiHeadMoEFeedForward
from .routers import ExpertChoiceRouter, Routing, TopKRouter
from .soft import SlotRouter, SoftMoEFeedForward, entmax15

__all__ = [
    "ROUTER_TYPES", "ExpertChoiceRouter", "MoEFeedForward", "MultiHeadMoEFeedForward", "Routing", "SlotRouter",
    "SoftMoEFeedForward", "StackedExperts", "TopKRouter", "active_expert_params", "build_moe_layer", "entmax15",
    "moe_tensor_layout",
]
