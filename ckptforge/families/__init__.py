"""Family registry: one adapter per dense architecture family, detected from ``config.json``.

    >>> detect_family({"model_type": "vit"}).name
    'vit'
"""

from __future__ import annotations

from typing import Any

from ckptforge.errors import UnsupportedArchitectureError

from .base import Dims, Family, MoELayout, OutputFormat
from .bert import BertFamily
from .llama import LlamaFamily
from .qwen3 import Qwen3Family
from .vit import ViTFamily

FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Add a family to the registry; a second family with the same name raises."""
    if family.name in FAMILIES:
        raise ValueError(f"family {family.name!r} is already registered")
    FAMILIES[family.name] = family
    return family


for _family in (ViTFamily(), BertFamily(), LlamaFamily(), Qwen3Family()):
    register_family(_family)


def detect_family(config: dict[str, Any]) -> Family:
    """The family that handles ``config``; the error lists every family and why it did not match."""
    reasons = []
    for family in FAMILIES.values():
        why = family.why_not(config)
        if why is None:
            return family
        reasons.append(f"{family.name}: {why}")
    supported = ", ".join(t for f in FAMILIES.values() for t in f.model_types)
    raise UnsupportedArchitectureError(
        f"unsupported architecture model_type={config.get('model_type')!r}; supported model types: "
        f"{supported} ({'; '.join(reasons)})"
    )


__all__ = ["FAMILIES", "Dims", "Family", "MoELayout", "OutputFormat", "detect_family", "register_family"]
