"""Routers: decide which experts see which tokens, and with what weight."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Routing:
    """A router's decision for T tokens: ``expert_index`` (T, k), ``weights`` (T, k), ``aux_loss``."""

    expert_index: torch.Tensor
    weights: torch.Tensor
    aux_loss: torch.Tensor
    probs: torch.Tensor


class TopKRouter(nn.Module):
    """Token-choice top-k routing (V-MoE): softmax over experts, then top-k.

    With ``normalize`` the k weights are renormalised to sum to 1, which makes an MoE whose
    experts are copies of one FFN compute exactly that FFN.

        >>> router = TopKRouter(hidden_size=8, num_experts=4, top_k=2)
        >>> r = router(torch.randn(5, 8))
        >>> r.expert_index.shape, bool(torch.allclose(r.weights.sum(-1), torch.ones(5)))
        (torch.Size([5, 2]), True)
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, normalize: bool = True):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.normalize = normalize
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> Routing:
        logits = x @ self.weight.T
        probs = torch.softmax(logits.float(), dim=-1)
        weights, index = torch.topk(probs, self.top_k, dim=-1)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return Routing(index, weights, _load_balancing_loss(probs, index, self.num_experts), probs)


def _load_balancing_loss(probs: torch.Tensor, index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch-style auxiliary loss: E · Σ_e (fraction of tokens routed to e) · (mean prob of e)."""
    counts = torch.zeros(num_experts, device=probs.device, dtype=probs.dtype)
    counts.scatter_add_(0, index.reshape(-1), torch.ones_like(index.reshape(-1), dtype=probs.dtype))
    fraction = counts / max(index.numel(), 1)
    return num_experts * (fraction * probs.mean(dim=0)).sum()
