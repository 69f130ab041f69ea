"""Pieces the ViT-MoE and BERT-MoE modeling files share: attention, MoE blocks, outputs.

Imports only torch, transformers and the runtime MoE layers, because it is copied into output
directories as remote code (``from ..moe.X`` becomes ``from .X`` there).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_outputs import ModelOutput

from ..moe.experts import check_experts_implementation, set_experts_implementation
from ..moe.layer import build_moe_layer


class SelfAttention(nn.Module):
    """Multi-head self-attention with the HF parameter names ``query`` / ``key`` / ``value``."""

    def __init__(self, hidden_size: int, num_heads: int, qkv_bias: bool, dropout: float):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_attention_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.query = nn.Linear(hidden_size, hidden_size, bias=qkv_bias)
        self.key = nn.Linear(hidden_size, hidden_size, bias=qkv_bias)
        self.value = nn.Linear(hidden_size, hidden_size, bias=qkv_bias)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, d = x.shape

        def heads(proj: nn.Linear) -> torch.Tensor:
            return proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

        out = nn.functional.scaled_dot_product_attention(
            heads(self.query), heads(self.key), heads(self.value),
            attn_mask=additive_mask, dropout_p=self.dropout if self.training else 0.0,
        )
        return out.transpose(1, 2).reshape(b, t, d)


def is_moe_layer(config, layer: int) -> bool:
    return layer in set(getattr(config, "moe_layers", None) or [])


def build_moe(config) -> nn.Module:
    """The MoE block a config's MoE layers use (its type is ``config.moe_router['type']``)."""
    return build_moe_layer(
        hidden_size=config.hidden_size,
        expert_width=config.expert_intermediate_size,
        num_experts=config.num_experts,
        top_k=config.num_experts_per_tok,
        activation=config.hidden_act,
        router=config.moe_router,
        output_scale=config.moe_output_scale,
        experts_implementation=getattr(config, "experts_implementation", "auto"),
    )


class ExpertsImplementationMixin:
    """Lets transformers' ``from_pretrained(..., experts_implementation=…)`` and
    ``model.set_experts_implementation(…)`` choose how the MoE experts compute (auto | eager |
    grouped_mm); the choice is ``config.experts_implementation``. Put before PreTrainedModel."""

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        name = check_experts_implementation(requested_experts or getattr(self.config, "experts_implementation", "auto"))
        self.config.experts_implementation = name
        set_experts_implementation(self, name)  # blocks already built (a switch after loading)
        return name

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        return True


def total_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of the weighted auxiliary (load-balancing) losses of every MoE block's last forward."""
    losses = [m.aux_loss for m in model.modules() if getattr(m, "aux_loss", None) is not None]
    return torch.stack(losses).sum() if losses else None


@dataclass
class MoEModelOutput(ModelOutput):
    """Encoder output plus the routers' auxiliary loss."""

    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    aux_loss: torch.FloatTensor | None = None


@dataclass
class MoEClassifierOutput(ModelOutput):
    """Classifier output plus the routers' auxiliary loss (not added into ``loss``)."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    aux_loss: torch.FloatTensor | None = None


def classification_loss(config, logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor | None:
    """The loss transformers' classifiers use, chosen by ``config.problem_type`` and the labels."""
    if labels is None:
        return None
    labels = labels.to(logits.device)
    if config.problem_type is None:
        if config.num_labels == 1:
            config.problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            config.problem_type = "single_label_classification"
        else:
            config.problem_type = "multi_label_classification"
    if config.problem_type == "regression":
        return nn.functional.mse_loss(logits.squeeze(), labels.squeeze().to(logits.dtype))
    if config.problem_type == "single_label_classification":
        return nn.functional.cross_entropy(logits.view(-1, config.num_labels), labels.view(-1))
    return nn.functional.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
