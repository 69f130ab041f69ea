"""BERT with Mixture-of-Experts feed-forward layers (``model_type: bert_moe``).

Dense parts keep the parameter names of Hugging Face BERT checkpoints; MoE layers hold
``encoder.layer.N.moe.router.weight`` and ``encoder.layer.N.moe.experts.{w1,b1,w2,b2}`` in place of
``intermediate.dense`` / ``output.dense`` (``output.LayerNorm`` stays). With the
ckptforge modules it imports inlined (:mod:`ckptforge.remote_code`), written into every bert_moe
output directory as ``modeling_bert_moe.py``.

    >>> config = BertMoEConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
    ...     num_attention_heads=2, intermediate_size=64, moe_layers=[1], num_experts=4,
    ...     num_experts_per_tok=2, expert_intermediate_size=64)
    >>> BertMoEModel(config)(torch.tensor([[1, 2, 3]])).last_hidden_state.shape
    torch.Size([1, 3, 32])
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN

from .common import (
    ExpertsImplementationMixin,
    MoEClassifierOutput,
    MoEModelOutput,
    SelfAttention,
    build_moe,
    classification_loss,
    is_moe_layer,
    total_aux_loss,
)
from .configuration_bert_moe import BertMoEConfig


def _dense_norm(config: BertMoEConfig, d_in: int) -> nn.Module:
    """A module with ``dense`` (d_in → hidden) and ``LayerNorm``, as BERT's *Output modules."""
    m = nn.Module()
    m.dense = nn.Linear(d_in, config.hidden_size)
    m.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
    return m


class BertMoEEmbeddings(nn.Module):
    def __init__(self, config: BertMoEConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        x = x + self.position_embeddings(positions)
        return self.dropout(self.LayerNorm(x))


class BertMoELayer(nn.Module):
    """Post-norm block: LN(x + attn(x)), then LN(h + ffn(h)) where ffn is dense or MoE."""

    def __init__(self, config: BertMoEConfig, layer: int):
        super().__init__()
        self.attention = nn.Module()
        self.attention.self = SelfAttention(
            config.hidden_size, config.num_attention_heads, True, config.attention_probs_dropout_prob
        )
        self.attention.output = _dense_norm(config, config.hidden_size)
        if is_moe_layer(config, layer):
            self.moe = build_moe(config)
            self.output = nn.Module()
            self.output.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        else:
            self.intermediate = nn.Module()
            self.intermediate.dense = nn.Linear(config.hidden_size, config.intermediate_size)
            self.output = _dense_norm(config, config.intermediate_size)
            self.act = ACT2FN[config.hidden_act]
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def feed_forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        if hasattr(self, "moe"):
            return self.moe(x, token_mask)
        return self.output.dense(self.act(self.intermediate.dense(x)))

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor | None,
                token_mask: torch.Tensor | None = None) -> torch.Tensor:
        a = self.dropout(self.attention.output.dense(self.attention.self(x, additive_mask)))
        h = self.attention.output.LayerNorm(a + x)
        return self.output.LayerNorm(self.dropout(self.feed_forward(h, token_mask)) + h)


class BertMoEPreTrainedModel(ExpertsImplementationMixin, PreTrainedModel):
    config_class = BertMoEConfig
    config: BertMoEConfig
    base_model_prefix = "bert"
    input_modalities = ("text",)
    _no_split_modules = ["BertMoELayer"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class BertMoEModel(BertMoEPreTrainedModel):
    """The BERT-MoE encoder with BERT's tanh pooler on [CLS] (``use_pooler``, default on)."""

    def __init__(self, config: BertMoEConfig, add_pooling_layer: bool | None = None):
        super().__init__(config)
        if add_pooling_layer is None:
            add_pooling_layer = getattr(config, "use_pooler", True)
        self.embeddings = BertMoEEmbeddings(config)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(BertMoELayer(config, i) for i in range(config.num_hidden_layers))
        if add_pooling_layer:
            self.pooler = nn.Module()
            self.pooler.dense = nn.Linear(config.hidden_size, config.hidden_size)
        else:
            self.pooler = None
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None, output_hidden_states: bool | None = None, **kwargs,
    ) -> MoEModelOutput:
        x = self.embeddings(input_ids, token_type_ids)
        additive = None
        if attention_mask is not None:
            additive = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        hidden = [x]
        for layer in self.encoder.layer:
            x = layer(x, additive, attention_mask)  # padding is not routed in MoE layers
            hidden.append(x)
        pooled = torch.tanh(self.pooler.dense(x[:, 0])) if self.pooler is not None else None
        keep = output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        return MoEModelOutput(x, pooled, tuple(hidden) if keep else None, total_aux_loss(self))


class BertMoEForSequenceClassification(BertMoEPreTrainedModel):
    """BERT-MoE with dropout + a linear classifier on the pooled output."""

    def __init__(self, config: BertMoEConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertMoEModel(config, add_pooling_layer=True)
        drop = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(drop)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None, **kwargs,
    ) -> MoEClassifierOutput:
        out = self.bert(input_ids, attention_mask, token_type_ids, output_hidden_states=output_hidden_states)
        logits = self.classifier(self.dropout(out.pooler_output))
        loss = classification_loss(self.config, logits, labels)
        return MoEClassifierOutput(loss, logits, out.hidden_states, out.aux_loss)


class BertMoEForMaskedLM(BertMoEPreTrainedModel):
    """BERT-MoE with BERT's masked-LM head; the decoder is tied to the word embeddings."""

    _tied_weights_keys = {
        "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
        "cls.predictions.decoder.bias": "cls.predictions.bias",
    }

    def __init__(self, config: BertMoEConfig):
        super().__init__(config)
        self.bert = BertMoEModel(config, add_pooling_layer=False)
        self.cls = nn.Module()
        self.cls.predictions = head = nn.Module()
        head.transform = _dense_norm(config, config.hidden_size)
        head.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        head.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.transform_act = ACT2FN[config.hidden_act]
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.bert.embeddings.word_embeddings

    def get_output_embeddings(self) -> nn.Linear:
        return self.cls.predictions.decoder

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None, **kwargs,
    ) -> MoEClassifierOutput:
        out = self.bert(input_ids, attention_mask, token_type_ids, output_hidden_states=output_hidden_states)
        head = self.cls.predictions
        h = head.transform.LayerNorm(self.transform_act(head.transform.dense(out.last_hidden_state)))
        logits = head.decoder(h)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.view(-1, self.config.vocab_size), labels.view(-1).to(logits.device))
        return MoEClassifierOutput(loss, logits, out.hidden_states, out.aux_loss)
