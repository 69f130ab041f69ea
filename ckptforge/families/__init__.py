"""Family registry: one adapter per dense architecture family, detected from ``config.json``, and
the output-format registry: every MoE format a family writes, keyed by its output ``model_type``.

    >>> detect_family({"model_type": "vit"}).name
    'vit'
    >>> format_of({"model_type": "mixtral"}).family, format_of({"model_type": "vit"}) is None
    ('llama', True)
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
#: Output ``model_type`` → its format: the only place a model type name is looked up outside ``families/``.
OUTPUT_FORMATS: dict[str, OutputFormat] = {}


def register_family(family: Family) -> Family:
    """Add a family and the output formats it writes; a second family or format with the same name raises."""
    if family.name in FAMILIES:
        raise ValueError(f"family {family.name!r} is already registered")
    formats = family.output_formats()
    for fmt in formats:
        if fmt.name in OUTPUT_FORMATS:
            raise ValueError(f"output format {fmt.name!r} is already registered")
        if fmt.family != family.name:
            raise ValueError(f"output format {fmt.name!r} says family {fmt.family!r}, not {family.name!r}")
    FAMILIES[family.name] = family
    OUTPUT_FORMATS.update({fmt.name: fmt for fmt in formats})
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


def format_of(config: dict[str, Any]) -> OutputFormat | None:
    """The registered output format of ``config['model_type']``; None for a dense or unknown model."""
    return OUTPUT_FORMATS.get(config.get("model_type"))


__all__ = ["FAMILIES", "OUTPUT_FORMATS", "Dims", "Family", "MoELayout", "OutputFormat", "detect_family", "format_of",
           "register_family"]
