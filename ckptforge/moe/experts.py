"""Experts stored as stacked tensors, computed one gathered batch per expert."""

from __future__ import annotations

import torch
from torch import nn


class StackedExperts(nn.Module):
    """E two-layer FFN experts (d → S → d) with weights stacked along a leading expert axis.

    Parameter names are part of the checkpoint format: ``w1`` (E, S, d), ``b1`` (E, S),
    ``w2`` (E, d, S), ``b2`` (E, d). ``dispatched`` counts the tokens (token-expert assignments)
    the experts have processed since it was last set to 0, so the compute a router actually spent
    can be measured (``dispatched · flops_per_token``); it is not part of the state dict.

        >>> experts = StackedExperts(num_experts=4, hidden_size=8, expert_width=16, activation="gelu")
        >>> experts.expert_forward(0, torch.randn(3, 8)).shape
        torch.Size([3, 8])
    """

    def __init__(self, num_experts: int, hidden_size: int, expert_width: int, activation: str, bias: bool = True):
        # imported here, not at module level: importing ckptforge.moe must not import transformers (whose
        # first import registers ckptforge's Auto classes, which need ckptforge.moe fully imported)
        from transformers.activations import ACT2FN

        super().__init__()
        self.num_experts = num_experts
        self.dispatched = 0
        self.w1 = nn.Parameter(torch.empty(num_experts, expert_width, hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, expert_width))
        self.b1 = nn.Parameter(torch.zeros(num_experts, expert_width)) if bias else None
        self.b2 = nn.Parameter(torch.zeros(num_experts, hidden_size)) if bias else None
        self.act = ACT2FN[activation]
        nn.init.normal_(self.w1, std=0.02)
        nn.init.normal_(self.w2, std=0.02)

    @property
    def flops_per_token(self) -> int:
        """Multiply-add FLOPs of one expert on one token: two matmuls d·S, 2 FLOPs per multiply-add."""
        _, width, hidden = self.w1.shape
        return 4 * width * hidden

    def expert_forward(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        """Run expert ``expert`` on the tokens ``x`` (n, d) it was given."""
        self.dispatched += x.shape[0]
        h = x @ self.w1[expert].T
        if self.b1 is not None:
            h = h + self.b1[expert]
        h = self.act(h) @ self.w2[expert].T
        if self.b2 is not None:
            h = h + self.b2[expert]
        return h

    def batched_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert on its own equal-size batch: ``x`` (E, n, d) → (E, n, d), two batched matmuls.

            >>> StackedExperts(2, 8, 16, "gelu").batched_forward(torch.randn(2, 5, 8)).shape
            torch.Size([2, 5, 8])
        """
        self.dispatched += x.shape[0] * x.shape[1]
        h = torch.bmm(x, self.w1.transpose(1, 2))
        if self.b1 is not None:
            h = h + self.b1[:, None]
        h = torch.bmm(self.act(h), self.w2.transpose(1, 2))
        if self.b2 is not None:
            h = h + self.b2[:, None]
        return h

    def forward(self, x: torch.Tensor, expert_index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Combine the experts' outputs: token t gets Σ_j weights[t, j] · expert[expert_index[t, j]](x_t).

        ``x`` (T, d); ``expert_index`` and ``weights`` (T, k). Entries with index −1 are skipped
        (dropped by capacity, or not chosen by an expert). The assignments are sorted by expert
        once; each expert then runs on one contiguous gathered batch. No loop over tokens.
        """
        out = torch.zeros_like(x)
        flat_index = expert_index.reshape(-1)
        token_of = torch.arange(x.shape[0], device=x.device).repeat_interleave(expert_index.shape[1])
        live = (flat_index >= 0).nonzero(as_tuple=True)[0]
        order = live[torch.argsort(flat_index[live], stable=True)]
        counts = torch.bincount(flat_index[order], minlength=self.num_experts).tolist()
        self.dispatched += sum(counts)
        tokens = token_of[order]
        gathered = x[tokens]
        flat_weight = weights.reshape(-1)[order, None].to(x.dtype)
        # unbind once: indexing w1[e] per expert would give every expert a full-size (E, S, d) gradient
        w1, w2 = self.w1.unbind(0), self.w2.unbind(0)
        b1 = self.b1.unbind(0) if self.b1 is not None else [None] * self.num_experts
        b2 = self.b2.unbind(0) if self.b2 is not None else [None] * self.num_experts
        ys = []
        for e, part in enumerate(gathered.split(counts)):
            if part.shape[0]:
                h = self.act(nn.functional.linear(part, w1[e], b1[e]))
                ys.append(nn.functional.linear(h, w2[e], b2[e]))
        if ys:
            out.index_add_(0, tokens, torch.cat(ys) * flat_weight)
        return out
