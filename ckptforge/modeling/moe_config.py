"""The MoE fields every ckptforge model config adds to its dense base config (written once).

``configuration_vit_moe.py`` and ``configuration_bert_moe.py`` mix :class:`MoEConfigFields` into
ViTConfig / BertConfig; an output directory's ``configuration_*.py`` is bundled with this module
inlined (:mod:`ckptforge.remote_code`), so it still imports only transformers. Standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(repr=False, kw_only=True)
class MoEConfigFields:
    """The MoE layout: which layers are MoE, experts, k, expert width, router, output scale and how
    the experts compute. transformers makes each config subclass a dataclass; these fields follow
    the dense config's, in this order."""

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
