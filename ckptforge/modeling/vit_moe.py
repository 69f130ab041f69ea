"""ViT with Mixture-of-Experts feed-forward layers (``model_type: vit_moe``).

Dense parts keep the parameter names of Hugging Face ViT checkpoints (``encoder.layer.N.attention
.attention.query`` …), so they are copied across unchanged; MoE layers hold ``encoder.layer.N.moe.
router.weight`` and ``encoder.layer.N.moe.experts.{w1,b1,w2,b2}``. This file, with the ckptforge
modules it imports inlined (:mod:`ckptforge.remote_code`), is written into every vit_moe output
directory as ``modeling_vit_moe.py``, the remote code ``trust_remote_code=True`` loads.

    >>> config = ViTMoEConfig(image_size=28, patch_size=7, num_channels=1, hidden_size=32,
    ...     num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, moe_layers=[1],
    ...     num_experts=4, num_experts_per_tok=2, expert_intermediate_size=64, num_labels=10)
    >>> ViTMoEForImageClassification(config)(torch.randn(1, 1, 28, 28)).logits.shape
    torch.Size([1, 10])
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
from .configuration_vit_moe import ViTMoEConfig


class ViTMoEEmbeddings(nn.Module):
    def __init__(self, config: ViTMoEConfig):
        super().__init__()
        size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
        patch = config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.patch_embeddings = nn.Module()
        self.patch_embeddings.projection = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=patch, stride=patch
        )
        self.position_embeddings = nn.Parameter(torch.zeros(1, (size // patch) ** 2 + 1, config.hidden_size))
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embeddings.projection(pixel_values.to(self.cls_token.dtype))
        x = x.flatten(2).transpose(1, 2)
        if x.shape[1] + 1 != self.position_embeddings.shape[1]:
            raise ValueError(
                f"input gives {x.shape[1]} patches but the model was built for "
                f"{self.position_embeddings.shape[1] - 1}; resize images to config.image_size"
            )
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.dropout(x + self.position_embeddings)


class ViTMoEAttention(nn.Module):
    def __init__(self, config: ViTMoEConfig):
        super().__init__()
        self.attention = SelfAttention(
            config.hidden_size, config.num_attention_heads, config.qkv_bias, config.attention_probs_dropout_prob
        )
        self.output = nn.Module()
        self.output.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.output.dense(self.attention(x)))


class ViTMoELayer(nn.Module):
    """Pre-norm block: x + attn(ln(x)), then + ffn(ln(·)) where ffn is dense or MoE."""

    def __init__(self, config: ViTMoEConfig, layer: int):
        super().__init__()
        self.attention = ViTMoEAttention(config)
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        if is_moe_layer(config, layer):
            self.moe = build_moe(config)
        else:
            self.intermediate = nn.Module()
            self.intermediate.dense = nn.Linear(config.hidden_size, config.intermediate_size)
            self.output = nn.Module()
            self.output.dense = nn.Linear(config.intermediate_size, config.hidden_size)
            self.act = ACT2FN[config.hidden_act]

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "moe"):
            return self.moe(x)
        return self.output.dense(self.act(self.intermediate.dense(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.layernorm_before(x))
        return x + self.dropout(self.feed_forward(self.layernorm_after(x)))


class ViTMoEPreTrainedModel(ExpertsImplementationMixin, PreTrainedModel):
    config_class = ViTMoEConfig
    config: ViTMoEConfig
    base_model_prefix = "vit"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = False
    _no_split_modules = ["ViTMoELayer"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, ViTMoEEmbeddings):
            nn.init.trunc_normal_(module.position_embeddings, std=std)
            nn.init.trunc_normal_(module.cls_token, std=std)


class ViTMoEModel(ViTMoEPreTrainedModel):
    """The ViT-MoE encoder; ``pooler`` as in ViTModel when ``add_pooling_layer``."""

    def __init__(self, config: ViTMoEConfig, add_pooling_layer: bool | None = None):
        super().__init__(config)
        if add_pooling_layer is None:
            add_pooling_layer = getattr(config, "use_pooler", True)
        self.embeddings = ViTMoEEmbeddings(config)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(ViTMoELayer(config, i) for i in range(config.num_hidden_layers))
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        if add_pooling_layer:
            self.pooler = nn.Module()
            self.pooler.dense = nn.Linear(config.hidden_size, config.pooler_output_size or config.hidden_size)
            self.pooler_act = ACT2FN[config.pooler_act]
        else:
            self.pooler = None
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool | None = None, **kwargs) -> MoEModelOutput:
        x = self.embeddings(pixel_values)
        hidden = [x]
        for layer in self.encoder.layer:
            x = layer(x)
            hidden.append(x)
        x = self.layernorm(x)
        pooled = self.pooler_act(self.pooler.dense(x[:, 0])) if self.pooler is not None else None
        keep = output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        return MoEModelOutput(x, pooled, tuple(hidden) if keep else None, total_aux_loss(self))


class ViTMoEForImageClassification(ViTMoEPreTrainedModel):
    """ViT-MoE with a linear classifier on the [CLS] token, as ViTForImageClassification."""

    def __init__(self, config: ViTMoEConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.vit = ViTMoEModel(config, add_pooling_layer=False)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()

    def forward(
        self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None, **kwargs,
    ) -> MoEClassifierOutput:
        out = self.vit(pixel_values, output_hidden_states=output_hidden_states)
        logits = self.classifier(out.last_hidden_state[:, 0])
        loss = classification_loss(self.config, logits, labels)
        return MoEClassifierOutput(loss, logits, out.hidden_states, out.aux_loss)

