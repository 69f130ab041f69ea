"""Strategy registry: expert-initialisation strategies by name.

    >>> sorted(STRATEGIES)[:1]
    ['copy-all']
"""

from __future__ import annotations

from ckptforge.errors import UsageError

from .base import DenseFFN, ExpertInit, LayerSelection, Strategy
from .coactivation import Coactivation
from .copy_all import CopyAll
from .granular import Granular
from .importance import Importance
from .random import Random
from .uniform import Uniform

STRATEGIES: dict[str, Strategy] = {}


def register_strategy(strategy: Strategy) -> Strategy:
    """Add a strategy to the registry; a second one with the same name raises."""
    if strategy.name in STRATEGIES:
        raise ValueError(f"strategy {strategy.name!r} is already registered")
    STRATEGIES[strategy.name] = strategy
    return strategy


def get_strategy(name: str) -> Strategy:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise UsageError(f"unknown strategy {name!r}; choose one of: {', '.join(STRATEGIES)}") from None


for _strategy in (CopyAll(), Random(), Uniform(), Importance(), Coactivation(), Granular()):
    register_strategy(_strategy)

__all__ = ["STRATEGIES", "DenseFFN", "ExpertInit", "LayerSelection", "Strategy", "get_strategy", "register_strategy"]
