"""Routers: decide which experts see which tokens, and with what weight.

Token choice (V-MoE top-k, with capacity and Batch Prioritized Routing) and expert choice
(sparse upcycling's encoder router). Both return a :class:`Routing` over the T tokens of a batch:
``expert_index`` (T, k) with −1 where an assignment was dropped, ``weights`` (T, k).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .settings import ExpertChoiceSettings, TopKSettings


@dataclass
class Routing:
    """A router's decision for T tokens: ``expert_index`` (T, k), ``weights`` (T, k), ``aux_loss``, ``probs`` (T, E)."""

    expert_index: torch.Tensor
    weights: torch.Tensor
    aux_loss: torch.Tensor
    probs: torch.Tensor


class TopKRouter(nn.Module):
    """Token-choice top-k routing (V-MoE): softmax over experts, then top-k.

    With ``normalize`` the k weights are renormalised to sum to 1, which makes an MoE whose
    experts are copies of one FFN compute exactly that FFN. In training, N(0, ``noise_std``²) is
    added to the logits (default 1/E). With ``capacity_factor`` C each expert takes at most
    round(k·T·C/E) tokens of the batch; the rest are dropped (index −1, weight 0) and the residual
    carries them. ``bpr`` fills capacity in order of each token's largest routing weight across
    the batch (Batch Prioritized Routing) instead of token position. ``requested`` counts the
    token-expert assignments asked for (k per routed token, before capacity) since it was last set
    to 0; with :attr:`StackedExperts.dispatched` it gives the share that capacity kept.

        >>> router = TopKRouter(hidden_size=8, num_experts=4, top_k=2)
        >>> r = router(torch.randn(5, 8))
        >>> r.expert_index.shape, bool(torch.allclose(r.weights.sum(-1), torch.ones(5)))
        (torch.Size([5, 2]), True)
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, normalize: bool = TopKSettings.normalize,
                 noise_std: float | None = TopKSettings.noise_std,
                 capacity_factor: float | None = TopKSettings.capacity_factor, bpr: bool = TopKSettings.bpr):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.normalize = normalize
        self.noise_std = 1.0 / num_experts if noise_std is None else noise_std
        self.capacity_factor = capacity_factor
        self.bpr = bpr
        self.requested = 0
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        nn.init.normal_(self.weight, std=0.02)

    def capacity(self, num_tokens: int) -> int | None:
        """Per-expert capacity round(k·T·C/E), or None without a capacity factor."""
        if self.capacity_factor is None:
            return None
        return max(1, round(self.top_k * num_tokens * self.capacity_factor / self.num_experts))

    def _top_k(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        probs = torch.softmax(logits, dim=-1)
        weights, index = torch.topk(probs, self.top_k, dim=-1)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return probs, weights, index

    def uncounted(self, x: torch.Tensor) -> Routing:
        """Top-k routing outside the batch's accounting (padded positions): no noise, no capacity,
        no load-balancing loss, and nothing the real tokens' routing depends on."""
        probs, weights, index = self._top_k((x @ self.weight.T).float())
        return Routing(index, weights, probs.new_zeros(()), probs)

    def forward(self, x: torch.Tensor) -> Routing:
        logits = (x @ self.weight.T).float()
        if self.training and self.noise_std > 0:
            logits = logits + torch.randn_like(logits) * self.noise_std
        probs, weights, index = self._top_k(logits)
        aux = load_balancing_loss(probs, index, self.num_experts)
        self.requested += index.numel()
        capacity = self.capacity(x.shape[0])
        if capacity is not None:
            priority = probs.max(dim=-1).values if self.bpr else None
            keep = capacity_mask(index, self.num_experts, capacity, priority)
            index = torch.where(keep, index, torch.full_like(index, -1))
            weights = weights * keep
        return Routing(index, weights, aux, probs)


def capacity_mask(index: torch.Tensor, num_experts: int, capacity: int,
                  priority: torch.Tensor | None = None) -> torch.Tensor:
    """Which of the (T, k) assignments fit into each expert's ``capacity``.

    All first choices are served before any second choice; within a choice, tokens go in order of
    ``priority`` (descending; Batch Prioritized Routing) or, without one, in position order.

        >>> capacity_mask(torch.tensor([[0], [0], [0]]), 2, 2, torch.tensor([0.1, 0.9, 0.5]))[:, 0].tolist()
        [False, True, True]
    """
    t, k = index.shape
    order = torch.argsort(priority, descending=True, stable=True) if priority is not None else torch.arange(t, device=index.device)
    ranked = index[order].T.reshape(-1)  # choice-major, priority order within a choice
    onehot = nn.functional.one_hot(ranked, num_experts)
    position = (onehot.cumsum(0) * onehot).sum(-1) - 1
    fits = (position < capacity).reshape(k, t).T
    keep = torch.empty_like(fits)
    keep[order] = fits
    return keep


class ExpertChoiceRouter(nn.Module):
    """Expert choice: each expert takes its top ⌈C·T/E⌉ tokens by router probability (C = 2).

    A token may be taken by 0..E experts. ``expert_index`` is (T, E): column e holds e where
    expert e took the token and −1 elsewhere; ``weights`` holds the router probability there.

        >>> r = ExpertChoiceRouter(hidden_size=8, num_experts=4)(torch.randn(6, 8))
        >>> (r.expert_index >= 0).sum(0).tolist()
        [3, 3, 3, 3]
    """

    def __init__(self, hidden_size: int, num_experts: int, capacity_factor: float = ExpertChoiceSettings.capacity_factor):
        super().__init__()
        self.num_experts = num_experts
        self.capacity_factor = capacity_factor
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        nn.init.normal_(self.weight, std=0.02)

    def capacity(self, num_tokens: int) -> int:
        """⌈C·T/E⌉, at most T."""
        return min(num_tokens, max(1, math.ceil(self.capacity_factor * num_tokens / self.num_experts)))

    def forward(self, x: torch.Tensor) -> Routing:
        probs = torch.softmax((x @ self.weight.T).float(), dim=-1)
        top, tokens = torch.topk(probs.T, self.capacity(x.shape[0]), dim=-1)  # (E, c)
        chosen = torch.zeros_like(probs, dtype=torch.bool)
        chosen.scatter_(0, tokens.T, True)
        experts = torch.arange(self.num_experts, device=x.device).expand_as(probs)
        index = torch.where(chosen, experts, torch.full_like(experts, -1))
        return Routing(index, probs * chosen, probs.new_zeros(()), probs)


def load_balancing_loss(probs: torch.Tensor, index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch-style auxiliary loss: E · Σ_e (fraction of assignments to e) · (mean prob of e).

        >>> float(load_balancing_loss(torch.full((4, 2), 0.5), torch.tensor([[0], [1], [0], [1]]), 2))
        1.0
    """
    flat = index.reshape(-1)
    flat = flat[flat >= 0]
    counts = torch.zeros(num_experts, device=probs.device, dtype=probs.dtype)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=probs.dtype))
    fraction = counts / max(flat.numel(), 1)
    return num_experts * (fraction * probs.mean(dim=0)).sum()
