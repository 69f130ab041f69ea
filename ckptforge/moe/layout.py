"""What each router type stores and shares, as data: the torch-free half of the router registry.

:data:`ROUTER_LAYOUTS` maps a router type to its settings class, the tensors its MoE block stores
(:func:`moe_tensor_layout`), the share of expert parameters one token uses
(:func:`active_expert_params`) and whether copy-all experts behind it stay exact
(:func:`exact_routing`). The planner reads it without importing torch; :mod:`.layer` adds the block
builders. Standard library only: it travels with the MoE layers as remote code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from .settings import (
    ExpertChoiceSettings, MultiHeadSettings, RouterSettings, SoftSettings, SpheroSettings, TopKSettings,
    router_settings,
)


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
    return ROUTER_LAYOUTS[settings.kind].layout(settings, hidden_size, num_experts, expert_width)


def universal_count(router: SpheroSettings, num_experts: int) -> int:
    """How many universal experts SpheroMoE adds: ``universal_experts``, by default twice the core count."""
    return 2 * num_experts if router.universal_experts is None else router.universal_experts


def universal_width(router: dict[str, Any] | SpheroSettings, expert_width: int) -> int:
    """Width of SpheroMoE's universal experts: ``universal_ratio`` of the core width."""
    settings = router if isinstance(router, RouterSettings) else router_settings(router)
    return max(1, round(expert_width * settings.universal_ratio))


def _plain_layout(router: RouterSettings, d: int, e: int, s: int) -> MoETensorLayout:
    return MoETensorLayout((e, d), [ExpertGroup("experts", e, s, d)])


def _slot_layout(router: SoftSettings, d: int, e: int, s: int) -> MoETensorLayout:
    groups = [ExpertGroup("experts", e, s, d)]
    if isinstance(router, SpheroSettings):
        groups.append(ExpertGroup("universal_experts", universal_count(router, e), universal_width(router, s), d, first=e))
    slots = sum(g.count for g in groups) * router.slots
    t = float(router.temperature)
    extras = {"router.slots": ((slots, d), "orthogonal"), "router.norm.weight": ((d,), "ones"),
              "router.norm.bias": ((d,), "zeros"), "router.dispatch_temperature": ((), t),
              "router.combine_temperature": ((), t)}
    return MoETensorLayout(None, groups, extras)


def _multihead_layout(router: MultiHeadSettings, d: int, e: int, s: int) -> MoETensorLayout:
    h = router.heads
    extras = {f"{p}.{w}": ((d, d) if w == "weight" else (d,), "identity" if w == "weight" else "zeros")
              for p in ("head_proj", "merge_proj") for w in ("weight", "bias")}
    return MoETensorLayout((e, d // h), [ExpertGroup("experts", e, s, d // h, channel_blocks=h)], extras)


@dataclass(frozen=True)
class RouterLayout:
    """One router type's data half: the settings class, the share of expert parameters one token's
    output depends on ``active_share(settings, E, k)``, the tensor layout
    ``layout(settings, hidden, E, expert_width)``, and whether copy-all experts behind this router
    compute the dense function exactly, ``exact(settings)``."""

    settings: type[RouterSettings]
    active_share: Callable[[Any, int, int], float]
    layout: Callable[..., MoETensorLayout]
    exact: Callable[[Any], bool] = lambda settings: False


def _exact_topk(router: TopKSettings) -> bool:
    """Renormalised weights of identical experts sum to 1, and no token is dropped without a capacity."""
    return bool(router.normalize) and router.capacity_factor is None


#: Router type → its layout entry. Active share: k of E experts (top-k); on average C of E
#: (expert choice, capacity factor C); up to h·k of E (MH-MoE: h sub-tokens, k experts each); all
#: (soft / sphero: every slot's expert reaches every token through the combine weights).
#: Exact: only renormalised top-k without a capacity limit keeps copy-all experts dense (issue 4).
ROUTER_LAYOUTS: dict[str, RouterLayout] = {
    "topk": RouterLayout(TopKSettings, lambda r, e, k: k / e, _plain_layout, _exact_topk),
    "expert-choice": RouterLayout(ExpertChoiceSettings, lambda r, e, k: min(1.0, r.capacity_factor / e), _plain_layout),
    "soft": RouterLayout(SoftSettings, lambda r, e, k: 1.0, _slot_layout),
    "sphero": RouterLayout(SpheroSettings, lambda r, e, k: 1.0, _slot_layout),
    "mh": RouterLayout(MultiHeadSettings, lambda r, e, k: min(1.0, r.heads * k / e), _multihead_layout),
}


def active_expert_params(router: dict[str, Any] | None, expert_params: int, num_experts: int, top_k: int) -> int:
    """How many of ``expert_params`` one token uses, by router type (see :data:`ROUTER_LAYOUTS`).

        >>> active_expert_params({"type": "topk"}, 800, 8, 2), active_expert_params({"type": "soft"}, 800, 8, 2)
        (200, 800)
    """
    settings = router_settings(router)
    return round(expert_params * ROUTER_LAYOUTS[settings.kind].active_share(settings, num_experts, top_k))


def exact_routing(router: dict[str, Any] | None) -> bool:
    """Whether copy-all experts behind ``router`` (a stored ``moe_router``; None: top-k defaults)
    compute the dense function exactly (see :data:`ROUTER_LAYOUTS`).

        >>> exact_routing(None), exact_routing({"type": "topk", "capacity_factor": 1.5}), exact_routing({"type": "soft"})
        (True, False, False)
    """
    settings = router_settings(router)
    return ROUTER_LAYOUTS[settings.kind].exact(settings)
