"""The MoE feed-forward blocks that replace a dense FFN, built by router type from ``config.moe_router``.

``ROUTERS`` is the registry and the only place that branches on a router type: type → its data half
(:data:`.layout.ROUTER_LAYOUTS`: settings class, active share, tensor layout, exactness; torch-free)
and its block builder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .experts import StackedExperts, set_experts_implementation
from .layout import ROUTER_LAYOUTS, RouterLayout, universal_count, universal_width
from .multihead import MultiHeadMoEFeedForward
from .routers import ExpertChoiceRouter, TopKRouter
from .settings import (
    ExpertChoiceSettings, MultiHeadSettings, RouterSettings, SoftSettings, SpheroSettings, TopKSettings,
    router_settings,
)
from .soft import SoftMoEFeedForward
from .tokens import padding_output, real_tokens, scatter_tokens


def _topk_args(s: TopKSettings) -> dict[str, Any]:
    return {"normalize": s.normalize, "noise_std": s.noise_std, "capacity_factor": s.capacity_factor, "bpr": s.bpr}


class MoEFeedForward(nn.Module):
    """Router + stacked experts (top-k token choice or expert choice); a drop-in for a dense FFN.

    ``router`` is the router's settings as stored in ``config.json`` (``{"type": "topk",
    "normalize": True}``). ``output_scale`` multiplies the combined expert output (granular
    upcycling keeps the dense function with it). ``aux_loss`` holds the last forward's
    load-balancing loss times ``aux_loss_weight`` (the router setting): the block owns the weight.

        >>> moe = MoEFeedForward(hidden_size=8, expert_width=16, num_experts=4, top_k=2, activation="gelu")
        >>> moe(torch.randn(2, 3, 8)).shape
        torch.Size([2, 3, 8])
    """

    def __init__(self, hidden_size: int, expert_width: int, num_experts: int, top_k: int, activation: str,
                 router: dict[str, Any] | RouterSettings | None = None, output_scale: float = 1.0, bias: bool = True):
        super().__init__()
        settings = router if isinstance(router, RouterSettings) else router_settings(router)
        if isinstance(settings, TopKSettings) and not isinstance(settings, MultiHeadSettings):
            self.router = TopKRouter(hidden_size, num_experts, top_k, **_topk_args(settings))
        elif isinstance(settings, ExpertChoiceSettings):
            self.router = ExpertChoiceRouter(hidden_size, num_experts, settings.capacity_factor)
        else:
            raise ValueError(f"router type {settings.kind!r} is not a token/expert-choice router; use 'topk' or 'expert-choice'")
        self.experts = StackedExperts(num_experts, hidden_size, expert_width, activation, bias=bias)
        self.output_scale = output_scale
        self.aux_loss_weight = float(getattr(settings, "aux_loss_weight", 0.0))
        self.aux_loss: torch.Tensor | None = None
        self.last_routing = None

    def forward(self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``token_mask`` (same leading shape, True for real tokens): padding takes no capacity and
        no expert's choice; it is routed top-k outside the accounting (zeros under expert choice)."""
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        keep = real_tokens(token_mask)
        real = x if keep is None else x[keep]
        routing = self.router(real)
        self.last_routing = routing
        self.aux_loss = routing.aux_loss * self.aux_loss_weight
        out = self.experts(real, routing.expert_index, routing.weights)
        out = scatter_tokens(out, keep, padding_output(self.router, self.experts, x, keep))
        if self.output_scale != 1.0:
            out = out * self.output_scale
        return out.reshape(shape)


def _token_choice(d: int, s: int, e: int, k: int, act: str, router: TopKSettings, scale: float) -> nn.Module:
    return MoEFeedForward(d, s, e, k, act, router, scale)


def _soft(d: int, s: int, e: int, k: int, act: str, router: SoftSettings, scale: float) -> nn.Module:
    dual = isinstance(router, SpheroSettings)
    return SoftMoEFeedForward(
        d, s, e, act, slots=router.slots, temperature=router.temperature,
        universal_experts=universal_count(router, e) if dual else 0,
        universal_width=universal_width(router, s) if dual else 0,
        combine=router.combine, expert_dropout=router.expert_dropout, drop_path=router.drop_path, output_scale=scale,
    )


def _multihead(d: int, s: int, e: int, k: int, act: str, router: MultiHeadSettings, scale: float) -> nn.Module:
    return MultiHeadMoEFeedForward(d, s, e, k, act, heads=router.heads, output_scale=scale,
                                   aux_loss_weight=float(router.aux_loss_weight), **_topk_args(router))


@dataclass(frozen=True)
class RouterType:
    """One registry entry: the router type's data half (:class:`.layout.RouterLayout`: settings class,
    tensor layout, active share, exactness) and its block builder
    ``build(hidden, expert_width, experts, top_k, activation, settings, output_scale)``."""

    shape: RouterLayout
    build: Callable[..., nn.Module]


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "topk": _token_choice, "expert-choice": _token_choice, "soft": _soft, "sphero": _soft, "mh": _multihead,
}
#: Router type → its registry entry (the layouts of :data:`.layout.ROUTER_LAYOUTS` with their builders).
ROUTERS: dict[str, RouterType] = {kind: RouterType(shape, _BUILDERS[kind]) for kind, shape in ROUTER_LAYOUTS.items()}
#: Router type → block builder (kept for callers of the earlier registry).
ROUTER_TYPES: dict[str, Callable[..., nn.Module]] = {kind: entry.build for kind, entry in ROUTERS.items()}


def build_moe_layer(hidden_size: int, expert_width: int, num_experts: int, top_k: int, activation: str,
                    router: dict[str, Any] | None = None, output_scale: float = 1.0,
                    experts_implementation: str = "auto") -> nn.Module:
    """The MoE block for ``router['type']`` (default topk); its experts compute with
    ``experts_implementation`` (auto | eager | grouped_mm, see :mod:`.experts`).

        >>> build_moe_layer(8, 16, 4, 2, "gelu", {"type": "sphero"}).universal_experts.num_experts
        8
    """
    kind = (router or {}).get("type", "topk")
    if kind not in ROUTERS:
        raise ValueError(f"router type {kind!r} is not available; use one of {', '.join(ROUTERS)}")
    settings = router_settings(router)
    problems = settings.value_problems(hidden_size)
    if problems:  # the settings are the one check of a router's values, whether planned or loaded
        raise ValueError("; ".join(problems))
    layer = ROUTERS[settings.kind].build(hidden_size, expert_width, num_experts, top_k, activation, settings, output_scale)
    set_experts_implementation(layer, experts_implementation)
    return layer
