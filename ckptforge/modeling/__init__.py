"""PreTrainedModel classes for ViT-MoE and BERT-MoE, registered with transformers' Auto classes.

After ``import ckptforge`` the outputs load with ``AutoModel*.from_pretrained``; without ckptforge
installed they load with ``trust_remote_code=True`` from the modeling files written beside them.
"""

from __future__ import annotations

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
)

from .bert_moe import BertMoEConfig, BertMoEForMaskedLM, BertMoEForSequenceClassification, BertMoEModel
from .vit_moe import ViTMoEConfig, ViTMoEForImageClassification, ViTMoEModel

_REGISTRY = [
    (ViTMoEConfig, {AutoModel: ViTMoEModel, AutoModelForImageClassification: ViTMoEForImageClassification}),
    (BertMoEConfig, {AutoModel: BertMoEModel, AutoModelForSequenceClassification: BertMoEForSequenceClassification,
                     AutoModelForMaskedLM: BertMoEForMaskedLM}),
]


def register_auto_classes() -> None:
    """Register the MoE configs and models with transformers' Auto classes (idempotent)."""
    for config_cls, models in _REGISTRY:
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        for auto, model_cls in models.items():
            auto.register(config_cls, model_cls, exist_ok=True)


register_auto_classes()

__all__ = [
    "BertMoEConfig", "BertMoEForMaskedLM", "BertMoEForSequenceClassification", "BertMoEModel",
    "ViTMoEConfig", "ViTMoEForImageClassification", "ViTMoEModel", "register_auto_classes",
]
