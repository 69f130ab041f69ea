"""Strategy registry: expert-initialisation strategies by name.

    >>> sorted(STRATEGIES)[:1]
    ['copy-all']
"""

from __future__ import annotations

from ckptforge.errors import UsageError
from ckptforge.strategy_settings import STRATEGY_SETTINGS

from .base import DenseFFN, ExpertInit, LayerSelection, Strategy
from .coactivation import Coactivation
from .copy_all import CopyAll
from .granular import Granular
from .importance import Importance
from .random import Random
from .uniform import Uniform

STRATEGIES: dict[str, Strategy] = {}


def register_strategy(strategy: Strategy) -> Strategy:
    """Add a strategy to the registry; a second one with the same name raises, and so does one whose
    settings class is not the one ``ckptforge/strategy_settings.py`` registers under its name (the flags,
    recipe checks and schema are generated from there, without importing torch)."""
    if strategy.name in STRATEGIES:
        raise ValueError(f"strategy {strategy.name!r} is already registered")
    if STRATEGY_SETTINGS.get(strategy.name) is not strategy.settings or strategy.settings.kind != strategy.name:
        raise ValueError(f"strategy {strategy.name!r}: add its settings class {strategy.settings.__name__} (kind "
                         f"{strategy.name!r}) to STRATEGY_SETTINGS in ckptforge/strategy_settings.py")
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
