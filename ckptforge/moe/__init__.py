"""Runtime MoE layers: routers, stacked experts and the MoE feed-forward blocks.

This package knows nothing of conversion. Its modules import only torch and transformers, and use
relative imports among themselves, because they are inlined into the ``modeling_*.py`` files of
outputs as remote code (:mod:`ckptforge.remote_code`). The names below load on first use, so ``ckptforge.moe.settings`` (standard library
only) can be read without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

#: public name → the submodule that defines it.
_PUBLIC = {
    "StackedExperts": "experts",
    "ROUTER_TYPES": "layer", "MoEFeedForward": "layer", "active_expert_params": "layout",
    "build_moe_layer": "layer", "exact_routing": "layout", "moe_tensor_layout": "layout",
    "MultiHeadMoEFeedForward": "multihead",
    "ExpertChoiceRouter": "routers", "Routing": "routers", "TopKRouter": "routers",
    "SlotRouter": "soft", "SoftMoEFeedForward": "soft", "entmax15": "soft",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value
    return value
