"""BERT (BertModel, BertForSequenceClassification, BertForMaskedLM / BertForPreTraining; other heads
keep the encoder) → ``bert_moe``."""

from __future__ import annotations

from typing import Any

from .encoder import EncoderFamily, encoder_format
from .state_names import bert_moe_names


class BertFamily(EncoderFamily):
    name = "bert"
    model_types = ("bert",)
    modality = "text"
    # Original Google checkpoints name LayerNorm parameters gamma / beta.
    renames = ((r"LayerNorm\.gamma$", "LayerNorm.weight"), (r"LayerNorm\.beta$", "LayerNorm.bias"))
    base_prefixes = ("bert.", "")
    anchor = "embeddings.word_embeddings.weight"
    format = encoder_format(
        "bert_moe", "bert", config_class="BertMoEConfig",
        auto_classes={"AutoModel": "BertMoEModel", "AutoModelForSequenceClassification": "BertMoEForSequenceClassification",
                      "AutoModelForMaskedLM": "BertMoEForMaskedLM"},
        pipelines={"BertMoEForSequenceClassification": "text-classification", "BertMoEModel": "feature-extraction",
                   "BertMoEForMaskedLM": "fill-mask"},
        state_names=bert_moe_names,
    )
    architectures = {
        "BertForSequenceClassification": ("BertMoEForSequenceClassification", "bert."),
        "BertForMaskedLM": ("BertMoEForMaskedLM", "bert."),
        "BertForPreTraining": ("BertMoEForMaskedLM", "bert."),  # the NSP head is not carried
        "BertModel": ("BertMoEModel", ""),
    }
    fallback = ("BertMoEModel", "")

    def check(self, config: dict[str, Any]) -> list[str]:
        problems = []
        if config.get("is_decoder") or config.get("add_cross_attention"):
            problems.append("BERT decoders / cross-attention are not supported; use an encoder checkpoint")
        if config.get("position_embedding_type", "absolute") != "absolute":
            problems.append(
                f"position_embedding_type {config.get('position_embedding_type')!r} is not supported; "
                "only 'absolute' BERT checkpoints convert"
            )
        return problems
