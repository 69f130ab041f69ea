"""The MoE feed-forward block that replaces a dense FFN."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .experts import StackedExperts
from .routers import TopKRouter


class MoEFeedForward(nn.Module):
    """Router + stacked experts; a drop-in replacement for a dense two-layer FFN.

    ``router`` is the router's settings as stored in ``config.json`` (``{"type": "topk",
    "normalize": True}``). ``output_scale`` multiplies the combined expert output (granular
    upcycling keeps the dense function with it). The auxiliary load-balancing loss of the last
    forward is kept in ``self.aux_loss``.

        >>> moe = MoEFeedForward(hidden_size=8, expert_width=16, num_experts=4, top_k=2, activation="gelu")
        >>> moe(torch.randn(2, 3, 8)).shape
        torch.Size([2, 3, 8])
    """

    def __init__(
        self,
        hidden_size: int,
        expert_width: int,
        num_experts: int,
        top_k: int,
        activation: str,
        router: dict[str, Any] | None = None,
        output_scale: float = 1.0,
        bias: bool = True,
    ):
        super().__init__()
        router = dict(router or {"type": "topk"})
        if router.get("type", "topk") != "topk":
            raise ValueError(f"router type {router.get('type')!r} is not available; use 'topk'")
        self.router = TopKRouter(hidden_size, num_experts, top_k, normalize=router.get("normalize", True))
        self.experts = StackedExperts(num_experts, hidden_size, expert_width, activation, bias=bias)
        self.output_scale = output_scale
        self.aux_loss: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        routing = self.router(x)
        self.aux_loss = routing.aux_loss
        out = self.experts(x, routing.expert_index, routing.weights)
        if self.output_scale != 1.0:
            out = out * self.output_scale
        return out.reshape(shape)
