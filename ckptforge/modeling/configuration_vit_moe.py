"""Configuration of ViT-MoE (``model_type: vit_moe``): ViTConfig plus the MoE fields.

Bundled with :mod:`.moe_config` inlined into every vit_moe output directory
(``configuration_vit_moe.py``, the ``AutoConfig`` entry of its ``auto_map``); imports only transformers.
"""

from __future__ import annotations

from transformers import ViTConfig

from .moe_config import MoEConfigFields


class ViTMoEConfig(MoEConfigFields, ViTConfig):
    """ViTConfig plus the MoE layout (:class:`MoEConfigFields`)."""

    model_type = "vit_moe"
