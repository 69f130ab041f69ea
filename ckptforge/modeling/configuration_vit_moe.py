"""Configuration of ViT-MoE (``model_type: vit_moe``): ViTConfig plus the MoE layout.

Written as it is into every vit_moe output directory (``configuration_vit_moe.py``, the
``AutoConfig`` entry of its ``auto_map``); imports only transformers.
"""

from __future__ import annotations

from transformers import ViTConfig


class ViTMoEConfig(ViTConfig):
    """ViTConfig plus the MoE layout: which layers are MoE, experts, k, expert width, router."""

    model_type = "vit_moe"

    moe_layers: list[int] | None = None
    num_experts: int = 8
    num_experts_per_tok: int = 2
    expert_intermediate_size: int | None = None
    moe_router: dict | None = None
    moe_output_scale: float = 1.0
    #: How the experts compute: auto | eager | grouped_mm (issue 15; see moe/experts.py).
    experts_implementation: str = "auto"

    def __post_init__(self, **kwargs):
        self.moe_layers = list(self.moe_layers or [])
        self.moe_router = dict(self.moe_router or {"type": "topk", "normalize": True})
        if self.expert_intermediate_size is None:
            self.expert_intermediate_size = self.intermediate_size
        super().__post_init__(**kwargs)
