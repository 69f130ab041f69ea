"""The MoE feed-forward blocks that replace a dense FFN, built by router type from ``config.moe_router``.

``ROUTER_TYPES`` is the registry: type → block builder. :func:`moe_tensor_layout` describes, as
data, the tensors each type adds beyond the core experts (so a converter can write them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .experts import StackedExperts, set_experts_implementation
from .multihead import MultiHeadMoEFeedForward
from .routers import ExpertChoiceRouter, TopKRouter
from .soft import SoftMoEFeedForward
from .tokens import real_tokens, scatter_tokens

#: Router settings that are not constructor arguments of the router itself.
_TOPK_KEYS = ("normalize", "noise_std", "capacity_factor", "bpr")


class MoEFeedForward(nn.Module):
    """Router + stacked experts (top-k token choice or expert choice); a drop-in for a dense FFN.

    ``router`` is the router's settings as stored in ``config.json`` (``{"type": "topk",
    "normalize": True}``). ``output_scale`` multiplies the combined expert output (granular
    upcycling keeps the dense function with it). ``aux_loss`` holds the last forward's
    load-balancing loss times ``aux_loss_weight`` (0.01 by default).

        >>> moe = MoEFeedForward(hidden_size=8, expert_width=16, num_experts=4, top_k=2, activation="gelu")
        >>> moe(torch.randn(2, 3, 8)).shape
        torch.Size([2, 3, 8])
    """

    def __init__(self, hidden_size: int, expert_width: int, num_experts: int, top_k: int, activation: str,
                 router: dict[str, Any] | None = None, output_scale: float = 1.0, bias: bool = True):
        super().__init__()
        router = dict(router or {"type": "topk"})
        kind = router.get("type", "topk")
        if kind == "topk":
            self.router = TopKRouter(hidden_size, num_experts, top_k, **{k: router[k] for k in _TOPK_KEYS if k in router})
        elif kind == "expert-choice":
            self.router = ExpertChoiceRouter(hidden_size, num_experts, router.get("capacity_factor", 2.0))
        else:
            raise ValueError(f"router type {kind!r} is not a token/expert-choice router; use 'topk' or 'expert-choice'")
        self.experts = StackedExperts(num_experts, hidden_size, expert_width, activation, bias=bias)
        self.output_scale = output_scale
        self.aux_loss_weight = float(router.get("aux_loss_weight", 0.01))
        self.aux_loss: torch.Tensor | None = None
        self.last_routing = None

    def forward(self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``token_mask`` (same leading shape, True for real tokens): padding is not routed, takes
        no capacity and no expert's choice, and gets a zero output."""
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        keep = real_tokens(token_mask)
        if keep is not None:
            x = x[keep]
        routing = self.router(x)
        self.last_routing = routing
        self.aux_loss = routing.aux_loss * self.aux_loss_weight
        out = self.experts(x, routing.expert_index, routing.weights)
        if self.output_scale != 1.0:
            out = out * self.output_scale
        return scatter_tokens(out, keep).reshape(shape)


def _token_choice(d: int, s: int, e: int, k: int, act: str, router: dict, scale: float) -> nn.Module:
    return MoEFeedForward(d, s, e, k, act, router, scale)


def _soft(d: int, s: int, e: int, k: int, act: str, router: dict, scale: float) -> nn.Module:
    dual = router.get("type") == "sphero"
    return SoftMoEFeedForward(
        d, s, e, act, slots=router.get("slots", 1), temperature=router.get("temperature", 0.5),
        universal_experts=router.get("universal_experts", 2 * e) if dual else 0,
        universal_width=universal_width(router, s) if dual else 0,
        combine=router.get("combine", "softmax"), expert_dropout=router.get("expert_dropout", 0.0),
        drop_path=router.get("drop_path", 0.0), output_scale=scale,
    )


def _multihead(d: int, s: int, e: int, k: int, act: str, router: dict, scale: float) -> nn.Module:
    block = MultiHeadMoEFeedForward(d, s, e, k, act, heads=router.get("heads", 4), output_scale=scale,
                                    **{key: router[key] for key in _TOPK_KEYS if key in router})
    block.aux_loss_weight = float(router.get("aux_loss_weight", 0.01))
    return block


def universal_width(router: dict[str, Any], expert_width: int) -> int:
    """Width of SpheroMoE's universal experts: ``universal_ratio`` (¼ by default) of the core width."""
    return max(1, round(expert_width * router.get("universal_ratio", 0.25)))


#: Router type → builder(hidden, expert_width, experts, top_k, activation, router settings, output_scale).
ROUTER_TYPES: dict[str, Callable[..., nn.Module]] = {
    "topk": _token_choice, "expert-choice": _token_choice, "soft": _soft, "sphero": _soft, "mh": _multihead,
}


#: Router type → share of a block's expert parameters that one token's output depends on, from
#: (router settings, experts E, top_k k): k of E experts (top-k); on average C of E (expert choice,
#: capacity factor C); up to h·k of E (MH-MoE: h sub-tokens, k experts each); all (soft / sphero:
#: every slot's expert reaches every token through the combine weights).
ACTIVE_EXPERT_SHARE: dict[str, Callable[[dict, int, int], float]] = {
    "topk": lambda router, e, k: k / e,
    "expert-choice": lambda router, e, k: min(1.0, router.get("capacity_factor", 2.0) / e),
    "mh": lambda router, e, k: min(1.0, router.get("heads", 4) * k / e),
    "soft": lambda router, e, k: 1.0,
    "sphero": lambda router, e, k: 1.0,
}


def active_expert_params(router: dict[str, Any] | None, expert_params: int, num_experts: int, top_k: int) -> int:
    """How many of ``expert_params`` one token uses, by router type (see :data:`ACTIVE_EXPERT_SHARE`).

        >>> active_expert_params({"type": "topk"}, 800, 8, 2), active_expert_params({"type": "soft"}, 800, 8, 2)
        (200, 800)
    """
    router = router or {"type": "topk"}
    share = ACTIVE_EXPERT_SHARE[router.get("type", "topk")](router, num_experts, top_k)
    return round(expert_params * share)


def build_moe_layer(hidden_size: int, expert_width: int, num_experts: int, top_k: int, activation: str,
                    router: dict[str, Any] | None = None, output_scale: float = 1.0,
                    experts_implementation: str = "auto") -> nn.Module:
    """The MoE block for ``router['type']`` (default topk); its experts compute with
    ``experts_implementation`` (auto | eager | grouped_mm, see :mod:`.experts`).

        >>> build_moe_layer(8, 16, 4, 2, "gelu", {"type": "sphero"}).universal_experts.num_experts
        8
    """
    router = dict(router or {"type": "topk"})
    kind = router.get("type", "topk")
    if kind not in ROUTER_TYPES:
        raise ValueError(f"router type {kind!r} is not available; use one of {', '.join(ROUTER_TYPES)}")
    layer = ROUTER_TYPES[kind](hidden_size, expert_width, num_experts, top_k, activation, router, output_scale)
    set_experts_implementation(layer, experts_implementation)
    return layer


@dataclass(frozen=True)
class ExpertGroup:
    """A packed expert group of an MoE block: ``name`` (module name), ``count``, ``width`` S, input width.

    ``first`` is the index of its first expert among the strategy's recycled experts; ``subset``
    < 1 keeps a uniform subset of each recycled expert's units; ``channel_blocks`` h > 1 gives
    expert e the input/output channels of block e mod h (MH-MoE's d/h-wide experts).
    """

    name: str
    count: int
    width: int
    in_dim: int
    first: int = 0
    channel_blocks: int = 1


@dataclass(frozen=True)
class MoETensorLayout:
    """What an MoE block stores beyond dense parts: the router weight, expert groups, extra tensors.

    ``extras`` maps a module-relative name to (shape, init) with init one of ``normal``, ``zeros``,
    ``ones``, ``identity``, ``orthogonal`` or a number (a constant).
    """

    router_shape: tuple[int, ...] | None
    groups: list[ExpertGroup]
    extras: dict[str, tuple[tuple[int, ...], Any]] = field(default_factory=dict)

    @property
    def recycled_experts(self) -> int:
        return max(g.first + g.count for g in self.groups)


def moe_tensor_layout(router: dict[str, Any], hidden_size: int, num_experts: int, expert_width: int) -> MoETensorLayout:
    """The tensors of one MoE block of type ``router['type']``, as data.

        >>> moe_tensor_layout({"type": "sphero"}, 8, 2, 16).groups[1]
        ExpertGroup(name='universal_experts', count=4, width=4, in_dim=8, first=2, channel_blocks=1)
    """
    kind, d, e = router.get("type", "topk"), hidden_size, num_experts
    core = ExpertGroup("experts", e, expert_width, d)
    if kind in ("soft", "sphero"):
        groups = [core]
        if kind == "sphero":
            groups.append(ExpertGroup("universal_experts", router.get("universal_experts", 2 * e),
                                      universal_width(router, expert_width), d, first=e))
        slots = sum(g.count for g in groups) * router.get("slots", 1)
        t = float(router.get("temperature", 0.5))
        extras = {"router.slots": ((slots, d), "orthogonal"), "router.norm.weight": ((d,), "ones"),
                  "router.norm.bias": ((d,), "zeros"), "router.dispatch_temperature": ((), t),
                  "router.combine_temperature": ((), t)}
        return MoETensorLayout(None, groups, extras)
    if kind == "mh":
        h = router.get("heads", 4)
        extras = {f"{p}.{w}": ((d, d) if w == "weight" else (d,), "identity" if w == "weight" else "zeros")
                  for p in ("head_proj", "merge_proj") for w in ("weight", "bias")}
        return MoETensorLayout((e, d // h), [ExpertGroup("experts", e, expert_width, d // h, channel_blocks=h)], extras)
    return MoETensorLayout((e, d), [core])
