"""Soft MoE and SpheroMoE (MoE Jetpack): slots that mix tokens, experts on slots, tokens that mix slots.

Every expert owns ``slots`` slots. Slot queries φ are orthogonal at init; keys are l2norm(x) and
queries l2norm(LayerNorm(φ)), so logits are cosines divided by a learnable temperature
(dispatch and combine each have one, init 0.5) and lie in [−1/τ, 1/τ]. Dispatch is a softmax over
the tokens of one sequence (each slot is a convex mix of raw tokens); combine is a softmax (or
entmax-1.5) over slots. ``soft`` has one expert group; ``sphero`` adds the dual path: universal
experts (more, narrower) whose slots compete with the core experts' slots in the same softmaxes.
"""

from __future__ import annotations

import torch
from torch import nn

from .experts import StackedExperts
from .settings import SoftSettings


def entmax15(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """1.5-entmax (Peters et al. 2019): a sparse softmax; sums to 1 along ``dim``.

        >>> entmax15(torch.tensor([3.0, 0.0, -3.0])).tolist()
        [1.0, 0.0, 0.0]
    """
    x = x.transpose(dim, -1) / 2
    x = x - x.max(dim=-1, keepdim=True).values
    srt = torch.sort(x, dim=-1, descending=True).values
    rho = torch.arange(1, x.shape[-1] + 1, device=x.device, dtype=x.dtype)
    mean = srt.cumsum(-1) / rho
    mean_sq = (srt ** 2).cumsum(-1) / rho
    delta = (1 - rho * (mean_sq - mean ** 2)) / rho
    tau = mean - torch.sqrt(torch.clamp(delta, min=0))
    support = (tau <= srt).sum(dim=-1, keepdim=True)
    tau_star = tau.gather(-1, support - 1)
    return torch.clamp(x - tau_star, min=0).pow(2).transpose(dim, -1)


#: ``SoftSettings.combine`` → the normalisation over slots (the settings check the name).
COMBINES = {"softmax": lambda logits: torch.softmax(logits, dim=-1), "entmax15": entmax15}


class SlotRouter(nn.Module):
    """Cosine slot routing with learnable temperatures; returns dispatch (B, T, n) and combine (B, T, n).

        >>> d, c = SlotRouter(8, 6)(torch.randn(2, 5, 8))
        >>> bool(torch.allclose(d.sum(1), torch.ones(2, 6))), bool(torch.allclose(c.sum(2), torch.ones(2, 5)))
        (True, True)
    """

    def __init__(self, hidden_size: int, num_slots: int, temperature: float = SoftSettings.temperature,
                 combine: str = SoftSettings.combine):
        super().__init__()
        self.slots = nn.Parameter(torch.empty(num_slots, hidden_size))
        self.norm = nn.LayerNorm(hidden_size)
        self.dispatch_temperature = nn.Parameter(torch.tensor(float(temperature)))
        self.combine_temperature = nn.Parameter(torch.tensor(float(temperature)))
        self.combine = combine
        nn.init.orthogonal_(self.slots)

    def cosine(self, x: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of every token with every slot query: (B, T, n)."""
        keys = nn.functional.normalize(x.float(), dim=-1)
        # in fp32 whatever the parameters' dtype (a bf16 LayerNorm refuses fp32 input on CPU)
        n = self.norm
        slots = nn.functional.layer_norm(self.slots.float(), n.normalized_shape, n.weight.float(), n.bias.float(), n.eps)
        queries = nn.functional.normalize(slots, dim=-1)
        return keys @ queries.T

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``token_mask`` (B, T), True for real tokens: slots mix real tokens only."""
        cos = self.cosine(x)
        dispatch_logits = cos / self.dispatch_temperature.clamp(min=1e-4)
        if token_mask is not None:
            pad = ~token_mask.bool()[..., None]
            dispatch_logits = dispatch_logits.masked_fill(pad, torch.finfo(dispatch_logits.dtype).min)
        dispatch = torch.softmax(dispatch_logits, dim=1)
        combine_logits = cos / self.combine_temperature.clamp(min=1e-4)
        return dispatch, COMBINES[self.combine](combine_logits)


class SoftMoEFeedForward(nn.Module):
    """Soft MoE / SpheroMoE block over (B, T, d) inputs; single path when ``universal_experts`` is 0.

        >>> moe = SoftMoEFeedForward(8, 16, 2, "gelu", universal_experts=4, universal_width=4)
        >>> moe(torch.randn(2, 5, 8)).shape
        torch.Size([2, 5, 8])
    """

    def __init__(self, hidden_size: int, expert_width: int, num_experts: int, activation: str, *,
                 slots: int = SoftSettings.slots, universal_experts: int = 0, universal_width: int = 0,
                 temperature: float = SoftSettings.temperature, combine: str = SoftSettings.combine,
                 expert_dropout: float = SoftSettings.expert_dropout, drop_path: float = SoftSettings.drop_path,
                 output_scale: float = 1.0, bias: bool = True):
        super().__init__()
        self.slots_per_expert = slots
        self.router = SlotRouter(hidden_size, (num_experts + universal_experts) * slots, temperature, combine)
        self.experts = StackedExperts(num_experts, hidden_size, expert_width, activation, bias=bias)
        self.universal_experts = (
            StackedExperts(universal_experts, hidden_size, universal_width, activation, bias=bias)
            if universal_experts else None
        )
        self.expert_dropout, self.drop_path, self.output_scale = expert_dropout, drop_path, output_scale
        self.aux_loss: torch.Tensor | None = None
        self.last_combine: torch.Tensor | None = None

    def _run_group(self, experts: StackedExperts, slot_inputs: torch.Tensor) -> torch.Tensor:
        b, n, d = slot_inputs.shape
        e, s = experts.num_experts, self.slots_per_expert
        x = slot_inputs.view(b, e, s, d).transpose(0, 1).reshape(e, b * s, d)
        y = experts.batched_forward(x)
        if self.training and self.expert_dropout > 0:
            keep = torch.rand(e, 1, 1, device=y.device) >= self.expert_dropout
            y = y * keep / (1 - self.expert_dropout)
        return y.reshape(e, b, s, d).transpose(0, 1).reshape(b, n, d)

    def forward(self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``token_mask`` (B, T), True for real tokens: padding does not enter the slots."""
        x = hidden_states if hidden_states.dim() == 3 else hidden_states[None]
        mask = None if token_mask is None else token_mask.reshape(x.shape[:2])
        dispatch, combine = self.router(x, mask)
        self.last_combine = combine.detach()
        slot_inputs = torch.einsum("btn,btd->bnd", dispatch.to(x.dtype), x)
        n_core = self.experts.num_experts * self.slots_per_expert
        outputs = [self._run_group(self.experts, slot_inputs[:, :n_core])]
        if self.universal_experts is not None:
            outputs.append(self._run_group(self.universal_experts, slot_inputs[:, n_core:]))
        out = torch.einsum("btn,bnd->btd", combine.to(x.dtype), torch.cat(outputs, dim=1))
        if self.training and self.drop_path > 0:
            keep = torch.rand(out.shape[0], 1, 1, device=out.device) >= self.drop_path
            out = out * keep / (1 - self.drop_path)
        self.aux_loss = None
        if self.output_scale != 1.0:
            out = out * self.output_scale
        return out.reshape(hidden_states.shape)
