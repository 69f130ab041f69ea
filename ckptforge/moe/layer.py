"""The MoE feed-forward blocks that replace a dense FFN, built by router type from ``config.moe_router``.

``ROUTERS`` is the registry and the only place that branches on a router type: type → settings
class (:mod:`.settings`), block builder, active share and tensor layout. :func:`moe_tensor_layout`
describes, as data, the tensors each type adds beyond the core experts (so a converter can write them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .experts import StackedExperts, set_experts_implementation
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
        universal_experts=_universal_count(router, e) if dual else 0,
        universal_width=universal_width(router, s) if dual else 0,
        combine=router.combine, expert_dropout=router.expert_dropout, drop_path=router.drop_path, output_scale=scale,
    )


def _multihead(d: int, s: int, e: int, k: int, act: str, router: MultiHeadSettings, scale: float) -> nn.Module:
    return MultiHeadMoEFeedForward(d, s, e, k, act, heads=router.heads, output_scale=scale,
                                   aux_loss_weight=float(router.aux_loss_weight), **_topk_args(router))


def _universal_count(router: SpheroSettings, num_experts: int) -> int:
    return 2 * num_experts if router.universal_experts is None else router.universal_experts


def universal_width(router: dict[str, Any] | SpheroSettings, expert_width: int) -> int:
    """Width of SpheroMoE's universal experts: ``universal_ratio`` of the core width."""
    settings = router if isinstance(router, RouterSettings) else router_settings(router)
    return max(1, round(expert_width * settings.universal_ratio))


@dataclass(frozen=True)
class RouterType:
    """One registry entry: the settings class, the block builder
    ``build(hidden, expert_width, experts, top_k, activation, settings, output_scale)``, the share of
    expert parameters one token's output depends on ``active_share(settings, E, k)``, the
    tensor layout ``layout(settings, hidden, E, expert_width)``, and whether copy-all experts
    behind this router compute the dense function exactly, ``exact(settings)``."""

    settings: type[RouterSettings]
    build: Callable[..., nn.Module]
    active_share: Callable[[Any, int, int], float]
    layout: Callable[..., "MoETensorLayout"]
    exact: Callable[[Any], bool] = lambda settings: False


def _plain_layout(router: RouterSettings, d: int, e: int, s: int) -> "MoETensorLayout":
    return MoETensorLayout((e, d), [ExpertGroup("experts", e, s, d)])


def _slot_layout(router: SoftSettings, d: int, e: int, s: int) -> "MoETensorLayout":
    groups = [ExpertGroup("experts", e, s, d)]
    if isinstance(router, SpheroSettings):
        groups.append(ExpertGroup("universal_experts", _universal_count(router, e), universal_width(router, s), d, first=e))
    slots = sum(g.count for g in groups) * router.slots
    t = float(router.temperature)
    extras = {"router.slots": ((slots, d), "orthogonal"), "router.norm.weight": ((d,), "ones"),
              "router.norm.bias": ((d,), "zeros"), "router.dispatch_temperature": ((), t),
              "router.combine_temperature": ((), t)}
    return MoETensorLayout(None, groups, extras)


def _multihead_layout(router: MultiHeadSettings, d: int, e: int, s: int) -> "MoETensorLayout":
    h = router.heads
    extras = {f"{p}.{w}": ((d, d) if w == "weight" else (d,), "identity" if w == "weight" else "zeros")
              for p in ("head_proj", "merge_proj") for w in ("weight", "bias")}
    return MoETensorLayout((e, d // h), [ExpertGroup("experts", e, s, d // h, channel_blocks=h)], extras)


def _exact_topk(router: TopKSettings) -> bool:
    """Renormalised weights of identical experts sum to 1, and no token is dropped without a capacity."""
    return bool(router.normalize) and router.capacity_factor is None


#: Router type → its registry entry. Active share: k of E experts (top-k); on average C of E
#: (expert choice, capacity factor C); up to h·k of E (MH-MoE: h sub-tokens, k experts each); all
#: (soft / sphero: every slot's expert reaches every token through the combine weights).
#: Exact: only renormalised top-k without a capacity limit keeps copy-all experts dense (issue 4).
ROUTERS: dict[str, RouterType] = {
    "topk": RouterType(TopKSettings, _token_choice, lambda r, e, k: k / e, _plain_layout, _exact_topk),
    "expert-choice": RouterType(ExpertChoiceSettings, _token_choice,
                                lambda r, e, k: min(1.0, r.capacity_factor / e), _plain_layout),
    "soft": RouterType(SoftSettings, _soft, lambda r, e, k: 1.0, _slot_layout),
    "sphero": RouterType(SpheroSettings, _soft, lambda r, e, k: 1.0, _slot_layout),
    "mh": RouterType(MultiHeadSettings, _multihead, lambda r, e, k: min(1.0, r.heads * k / e), _multihead_layout),
}
#: Router type → block builder (kept for callers of the earlier registry).
ROUTER_TYPES: dict[str, Callable[..., nn.Module]] = {kind: entry.build for kind, entry in ROUTERS.items()}


def active_expert_params(router: dict[str, Any] | None, expert_params: int, num_experts: int, top_k: int) -> int:
    """How many of ``expert_params`` one token uses, by router type (see :data:`ROUTERS`).

        >>> active_expert_params({"type": "topk"}, 800, 8, 2), active_expert_params({"type": "soft"}, 800, 8, 2)
        (200, 800)
    """
    settings = router_settings(router)
    return round(expert_params * ROUTERS[settings.kind].active_share(settings, num_experts, top_k))


def exact_routing(router: dict[str, Any] | None) -> bool:
    """Whether copy-all experts behind ``router`` (a stored ``moe_router``; None: top-k defaults)
    compute the dense function exactly (see :data:`ROUTERS`).

        >>> exact_routing(None), exact_routing({"type": "topk", "capacity_factor": 1.5}), exact_routing({"type": "soft"})
        (True, False, False)
    """
    settings = router_settings(router)
    return ROUTERS[settings.kind].exact(settings)


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
    settings = router_settings(router)
    return ROUTERS[settings.kind].layout(settings, hidden_size, num_experts, expert_width)
