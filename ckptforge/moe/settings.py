"""Router settings: one frozen dataclass per router type; each default is written here and nowhere else.

Standard library only: this file travels with the MoE layers as remote code. A field's metadata
gives its help text, its CLI flag when that is not ``--`` + the name with ``-``, and its check;
``ckptforge upcycle``'s router flags, recipe validation and ``docs/cli.md`` are derived from it.
``config.json`` keeps a router as the dict of the values that were given (``{"type": "topk",
"normalize": True}``); :func:`router_settings` fills in the rest from here.

    >>> router_settings({"type": "mh", "heads": 2}).aux_loss_weight
    0.01
    >>> router_settings({"type": "topk", "heads": 2}).problems()
    ['--heads does not apply to --router topk; it is a setting of --router mh: drop it or use that router']
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Callable, ClassVar


def setting(default: Any, help: str, check: str | None = None, flag: str | None = None,
            choices: tuple[str, ...] = ()) -> Any:
    """A settings field: ``check`` is ``positive``, ``non_negative``, ``fraction`` ([0, 1)) or ``share`` ([0, 1])."""
    return field(default=default, metadata={"help": help, "check": check, "flag": flag, "choices": choices})


def flag_in(registry: dict[str, type], name: str) -> str:
    """The ``upcycle`` flag of setting ``name`` among ``registry``'s classes: its field's own ``flag``
    when one declares it, else ``--`` + the name with dashes."""
    for cls in registry.values():
        for f in fields(cls):
            if f.name == name and f.metadata.get("flag"):
                return f.metadata["flag"]
    return "--" + name.replace("_", "-")


def flag_of(name: str) -> str:
    """The ``upcycle`` flag of a router setting (``noise_std`` → ``--router-noise``)."""
    return flag_in(ROUTER_SETTINGS, name)


@dataclass(frozen=True)
class RouterSettings:
    """Base of the per-router settings; ``kind`` is the router type name."""

    kind: ClassVar[str] = ""
    given: frozenset[str] = field(default=frozenset(), repr=False, compare=False)

    def problems(self, hidden_size: int | None = None) -> list[str]:
        """Every problem with these settings (keys of another router, bad values), each naming its flag and the fix."""
        out = [_not_here(self.kind, name) for name in sorted(self.given) if name not in _names(type(self))]
        return out + self.value_problems(hidden_size)

    def value_problems(self, hidden_size: int | None = None) -> list[str]:
        """Every value out of its range or choices (what a block refuses to be built with)."""
        return check_fields(self, flag_of)


def check_fields(settings: Any, flag: Callable[[str], str]) -> list[str]:
    """The failed ``check``s and ``choices`` of a settings object's fields, each naming ``flag(field name)``.

    Shared by the router settings here and the strategy settings (``ckptforge/strategy_settings.py``).
    """
    out = []
    for f in fields(settings):
        value, check = getattr(settings, f.name), f.metadata.get("check")
        if value is None or f.name == "given":
            continue
        name = flag(f.name)
        if check == "positive" and not value > 0:
            out.append(f"{name} {value} must be positive")
        elif check == "non_negative" and not value >= 0:
            out.append(f"{name} {value} must not be negative")
        elif check == "fraction" and not 0 <= value < 1:
            out.append(f"{name} {value} must be in [0, 1)")
        elif check == "share" and not 0 <= value <= 1:
            out.append(f"{name} {value} must be in [0, 1]")
        if f.metadata.get("choices") and value not in f.metadata["choices"]:
            out.append(f"{name} {value!r} is not one of {', '.join(f.metadata['choices'])}")
    return out


@dataclass(frozen=True)
class TopKSettings(RouterSettings):
    """Token choice top-k (V-MoE)."""

    kind: ClassVar[str] = "topk"
    normalize: bool = setting(True, "renormalise the k routing weights to sum to 1 (exact copy-all)")
    noise_std: float | None = setting(None, "std of training noise on router logits (none: 1/E)", "non_negative",
                                      flag="--router-noise")
    capacity_factor: float | None = setting(None, "per-expert capacity round(k·T·C/E) (none: no limit)", "positive")
    bpr: bool = setting(True, "Batch Prioritized Routing when capacity is short")
    aux_loss_weight: float = setting(0.01, "weight of the load-balancing loss in training", "non_negative")


@dataclass(frozen=True)
class ExpertChoiceSettings(RouterSettings):
    """Expert choice (sparse upcycling's encoder router)."""

    kind: ClassVar[str] = "expert-choice"
    capacity_factor: float = setting(2.0, "C in each expert's ⌈C·T/E⌉ tokens", "positive")


@dataclass(frozen=True)
class SoftSettings(RouterSettings):
    """Soft MoE slots (MoE Jetpack's SpheroMoE without the dual path)."""

    kind: ClassVar[str] = "soft"
    slots: int = setting(1, "slots per expert", "positive")
    temperature: float = setting(0.5, "initial dispatch and combine temperature", "positive")
    combine: str = setting("softmax", "normalisation over the slots", choices=("softmax", "entmax15"))
    expert_dropout: float = setting(0.0, "expert dropout in training", "fraction")
    drop_path: float = setting(0.0, "drop-path on the MoE output in training", "fraction")


@dataclass(frozen=True)
class SpheroSettings(SoftSettings):
    """SpheroMoE: soft slots plus the dual path of narrower universal experts."""

    kind: ClassVar[str] = "sphero"
    universal_experts: int | None = setting(None, "universal experts (none: 2× core)", "non_negative")
    universal_ratio: float = setting(0.25, "universal expert width / core width", "positive")


@dataclass(frozen=True)
class MultiHeadSettings(TopKSettings):
    """MH-MoE: h sub-tokens per token, each routed top-k."""

    kind: ClassVar[str] = "mh"
    heads: int = setting(4, "sub-tokens per token (must divide the hidden size)", "positive")

    def value_problems(self, hidden_size: int | None = None) -> list[str]:
        out = super().value_problems(hidden_size)
        if hidden_size is not None and self.heads > 0 and hidden_size % self.heads:
            out.append(f"--heads {self.heads} does not divide hidden size {hidden_size}; use a divisor of {hidden_size}")
        return out


#: Router type → its settings class (the order is the order of ``--router``'s choices).
ROUTER_SETTINGS: dict[str, type[RouterSettings]] = {
    cls.kind: cls for cls in (TopKSettings, ExpertChoiceSettings, SoftSettings, SpheroSettings, MultiHeadSettings)
}


def _names(cls: type) -> set[str]:
    return {f.name for f in fields(cls)} - {"given"}


def _not_here(kind: str, name: str) -> str:
    owners = [k for k, cls in ROUTER_SETTINGS.items() if name in _names(cls)]
    if not owners:
        return f"{flag_of(name)} is not a router setting; drop it"
    where = " or ".join(f"--router {k}" for k in owners)
    return f"{flag_of(name)} does not apply to --router {kind}; it is a setting of {where}: drop it or use that router"


def router_settings(router: dict[str, Any] | None) -> RouterSettings:
    """The settings object of a stored router dict (``config.json``'s ``moe_router``), defaults filled in.

    Keys that belong to another router are kept aside (``given``) so that :meth:`problems` names them.
    """
    router = dict(router or {"type": "topk"})
    kind = router.pop("type", "topk")
    if kind not in ROUTER_SETTINGS:
        raise ValueError(f"--router {kind!r} is not one of {', '.join(ROUTER_SETTINGS)}")
    cls = ROUTER_SETTINGS[kind]
    own = _names(cls)
    return cls(given=frozenset(router), **{k: v for k, v in router.items() if k in own})

