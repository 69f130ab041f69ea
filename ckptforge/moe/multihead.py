"""MH-MoE: split each token into h sub-tokens, route the sub-tokens top-k, merge them back.

A head projection d → d, a split into h sub-tokens of width d/h, top-k routing of every sub-token
to experts of input width d/h, the merge back into d and an output projection d → d. With h = 1
and identity projections it is exactly the top-k MoE.
"""

from __future__ import annotations

import torch
from torch import nn

from .experts import StackedExperts
from .routers import TopKRouter
from .settings import TopKSettings
from .tokens import padding_output, real_tokens, scatter_tokens


class MultiHeadMoEFeedForward(nn.Module):
    """MH-MoE block; ``router`` keyword arguments go to the sub-token :class:`TopKRouter`.

    ``aux_loss`` holds the last forward's load-balancing loss times ``aux_loss_weight``.

        >>> moe = MultiHeadMoEFeedForward(8, 16, 4, 2, "gelu", heads=2)
        >>> moe(torch.randn(2, 3, 8)).shape
        torch.Size([2, 3, 8])
    """

    def __init__(self, hidden_size: int, expert_width: int, num_experts: int, top_k: int, activation: str, *,
                 heads: int, output_scale: float = 1.0, bias: bool = True,
                 aux_loss_weight: float = TopKSettings.aux_loss_weight, **router):
        super().__init__()
        if hidden_size % heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by heads {heads}")
        self.heads = heads
        sub = hidden_size // heads
        self.head_proj = nn.Linear(hidden_size, hidden_size)
        self.merge_proj = nn.Linear(hidden_size, hidden_size)
        self.router = TopKRouter(sub, num_experts, top_k, **router)
        self.experts = StackedExperts(num_experts, sub, expert_width, activation, bias=bias)
        self.output_scale = output_scale
        self.aux_loss_weight = aux_loss_weight
        self.aux_loss: torch.Tensor | None = None
        self.last_routing = None

    def forward(self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``token_mask`` (True for real tokens): the sub-tokens of padding take no capacity; they are
        routed top-k outside the accounting."""
        shape = hidden_states.shape
        x = self.head_proj(hidden_states.reshape(-1, shape[-1]))
        sub_tokens = x.reshape(-1, shape[-1] // self.heads)
        keep = real_tokens(token_mask, self.heads)
        real = sub_tokens if keep is None else sub_tokens[keep]
        routing = self.router(real)
        self.last_routing = routing
        self.aux_loss = routing.aux_loss * self.aux_loss_weight  # the block owns the weight, as top-k does
        y = self.experts(real, routing.expert_index, routing.weights)
        y = scatter_tokens(y, keep, padding_output(self.router, self.experts, sub_tokens, keep)).reshape(-1, shape[-1])
        out = self.merge_proj(y)
        if self.output_scale != 1.0:
            out = out * self.output_scale
        return out.reshape(shape)
