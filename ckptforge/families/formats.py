"""What every command asks of a model by its ``model_type``, answered from the format and family registries.

``verify``, ``routes``, ``eval``, ``inspect``, the card and loading ask here (which layers are MoE,
the family and modality, dummy inputs of that modality) instead of comparing type names.
Standard library only at import time; torch is imported by :func:`dummy_inputs` when it runs.

    >>> moe_layers_of({"model_type": "qwen2_moe", "num_hidden_layers": 3, "mlp_only_layers": [1]})
    [0, 2]
    >>> modality_of({"model_type": "vit_moe"}), modality_of({"model_type": "bert"}), modality_of({})
    ('image', 'text', 'text')
"""

from __future__ import annotations

from typing import Any, Callable

from ckptforge.errors import UnsupportedArchitectureError

from . import FAMILIES, Family, detect_family, format_of


def moe_layers_of(config: dict[str, Any]) -> list[int]:
    """The MoE layers of a model's config (its format's rule); [] for a dense model."""
    fmt = format_of(config)
    return fmt.moe_layers(config) if fmt is not None else []


def family_of(config: dict[str, Any]) -> Family | None:
    """The dense family of a model: the one its MoE format is written from, or the one that reads it; None if none."""
    fmt = format_of(config)
    if fmt is not None:
        return FAMILIES[fmt.family]
    try:
        return detect_family(config)
    except UnsupportedArchitectureError:
        return None


def modality_of(config: dict[str, Any]) -> str:
    """``image`` or ``text``: what the model's inputs are (text when the family is unknown)."""
    family = family_of(config)
    return family.modality if family is not None else "text"


def _images(config: dict[str, Any], batch_size: int, seq_len: int, generator: Any) -> tuple[dict[str, Any], str]:
    import torch

    size = config.get("image_size", 224)
    size = size if isinstance(size, int) else size[0]
    shape = (batch_size, config.get("num_channels", 3), size, size)
    return {"pixel_values": torch.randn(shape, generator=generator)}, f"{batch_size} random images {tuple(shape[1:])}"


def _token_ids(config: dict[str, Any], batch_size: int, seq_len: int, generator: Any) -> tuple[dict[str, Any], str]:
    import torch

    ids = torch.randint(0, int(config.get("vocab_size", 1000)), (batch_size, seq_len), generator=generator)
    return {"input_ids": ids}, f"{batch_size}×{seq_len} random token ids"


#: Modality → the seeded dummy inputs of a model of that modality.
DUMMY_INPUTS: dict[str, Callable[..., tuple[dict[str, Any], str]]] = {"image": _images, "text": _token_ids}


def dummy_inputs(config: dict[str, Any], batch_size: int, seq_len: int, seed: int) -> tuple[dict[str, Any], str]:
    """Seeded inputs of the model's modality (random images, or random token ids) and their description.

        >>> dummy_inputs({"model_type": "bert", "vocab_size": 10}, 2, 4, 0)[1]
        '2×4 random token ids'
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    return DUMMY_INPUTS[modality_of(config)](config, batch_size, seq_len, generator)
