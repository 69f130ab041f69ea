"""Runtime MoE layers: routers, stacked experts and the MoE feed-forward block.

This package knows nothing of conversion. Its modules import only torch and transformers, and use
relative imports among themselves, because they are copied next to ``modeling_*.py`` files as
remote code.
"""

from .experts import StackedExperts
from .layer import MoEFeedForward
from .routers import TopKRouter

__all__ = ["MoEFeedForward", "StackedExperts", "TopKRouter"]
