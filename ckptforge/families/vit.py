"""ViT (ViTModel, ViTForImageClassification) → ``vit_moe``."""

from __future__ import annotations

from .encoder import EncoderFamily, encoder_format
from .state_names import vit_moe_names

_LAYER = r"(^|\.)layers\.(\d+)\."


class ViTFamily(EncoderFamily):
    name = "vit"
    model_types = ("vit",)
    modality = "image"
    # transformers 5 in memory: vit.layers.N.{attention.q_proj, mlp.fc1, …}; on disk: vit.encoder.layer.N.…
    renames = (
        (_LAYER + r"attention\.q_proj\.", r"\1encoder.layer.\2.attention.attention.query."),
        (_LAYER + r"attention\.k_proj\.", r"\1encoder.layer.\2.attention.attention.key."),
        (_LAYER + r"attention\.v_proj\.", r"\1encoder.layer.\2.attention.attention.value."),
        (_LAYER + r"attention\.o_proj\.", r"\1encoder.layer.\2.attention.output.dense."),
        (_LAYER + r"mlp\.fc1\.", r"\1encoder.layer.\2.intermediate.dense."),
        (_LAYER + r"mlp\.fc2\.", r"\1encoder.layer.\2.output.dense."),
        (_LAYER + r"(layernorm_before|layernorm_after)\.", r"\1encoder.layer.\2.\3."),
    )
    base_prefixes = ("vit.", "")
    anchor = "embeddings.cls_token"
    format = encoder_format(
        "vit_moe", "vit", config_class="ViTMoEConfig",
        auto_classes={"AutoModel": "ViTMoEModel", "AutoModelForImageClassification": "ViTMoEForImageClassification"},
        pipelines={"ViTMoEForImageClassification": "image-classification", "ViTMoEModel": "image-feature-extraction"},
        state_names=vit_moe_names,
    )
    architectures = {
        "ViTForImageClassification": ("ViTMoEForImageClassification", "vit."),
        "ViTModel": ("ViTMoEModel", ""),
    }
    fallback = ("ViTMoEModel", "")
