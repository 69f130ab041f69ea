"""Flags generated from settings dataclasses: the router settings (``ckptforge/moe/settings.py``) and
the strategy settings (``ckptforge/strategy_settings.py``).

Each settings field becomes one flag (``--`` + name, or the field's ``flag``); a field several
routers or strategies share (``capacity_factor``, ``expert_width``) is one flag whose help lists
each one's meaning, choices and default. A new setting is one field there; its flag, help, recipe
override and ``docs/cli.md`` entry follow from it.
"""

from __future__ import annotations

import inspect
import typing
from dataclasses import MISSING, Field, dataclass, fields
from typing import Annotated, Any, Callable

import typer

from ckptforge.moe import settings as router_settings
from ckptforge import strategy_settings


@dataclass(frozen=True)
class SettingsFlags:
    """The flags of one family of settings classes (``registry``: name → class)."""

    registry: dict[str, type]
    flag_of: Callable[[str], str]
    #: The ``UpcycleOptions`` field the values go into (``router`` / ``strategy_params``).
    target: str

    def fields(self) -> dict[str, list[tuple[str, Field]]]:
        """Setting name → [(router type or strategy, its field)], over the whole registry."""
        out: dict[str, list[tuple[str, Field]]] = {}
        for kind, cls in self.registry.items():
            for f in fields(cls):
                if f.name != "given" and f.default is not MISSING:
                    out.setdefault(f.name, []).append((kind, f))
        return out

    def params(self) -> dict[str, str]:
        """Python parameter name of each flag → the setting it sets (``router_noise`` → ``noise_std``)."""
        return {self.flag_of(name)[2:].replace("-", "_"): name for name in self.fields()}

    def values(self, flags: dict[str, Any]) -> dict[str, Any]:
        """The settings given as flags (not None), by setting name."""
        return {name: flags[p] for p, name in self.params().items() if flags.get(p) is not None}

    def type_of(self, name: str) -> type:
        """The Python type of a setting (``int | None`` → ``int``)."""
        for cls in self.registry.values():
            hints = typing.get_type_hints(cls)
            if name in hints:
                args = [a for a in typing.get_args(hints[name]) if a is not type(None)]
                return args[0] if args else hints[name]
        raise KeyError(name)

    def help(self, name: str) -> str:
        """One flag's help: each owner's meaning, choices and default (owners that differ only in
        choices or default share the meaning: ``text: random: a | b (default a); coactivation: …``)."""
        groups: dict[str, dict[tuple[str, str], list[str]]] = {}
        for kind, f in self.fields()[name]:
            choices = " | ".join(f.metadata.get("choices") or ())
            default = "" if f.default is None else f"(default {f.default})"
            groups.setdefault(f.metadata["help"], {}).setdefault((choices, default), []).append(kind)
        parts = []
        for text, variants in groups.items():
            if len(variants) == 1:
                ((choices, default), kinds), = variants.items()
                parts.append(f"{'/'.join(kinds)}: {text}{_values(choices, default)}")
            else:
                parts.append(f"{text}: " + "; ".join(f"{'/'.join(k)}{_values(*v)}" for v, k in variants.items()))
        return "; ".join(parts) + "."

    def parameters(self) -> list[inspect.Parameter]:
        """One keyword parameter (default None: not given) per setting, for a typer command."""
        out = []
        for pname, name in self.params().items():
            kind, flag = self.type_of(name), self.flag_of(name)
            decls = [f"{flag}/--no-{flag[2:]}"] if kind is bool else [flag]
            out.append(inspect.Parameter(pname, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
                kind | None, typer.Option(*decls, help=self.help(name))]))
        return out


def _values(choices: str, default: str) -> str:
    """``: a | b (default a)``, `` (default 2.0)`` or nothing."""
    return (f": {choices}" if choices else "") + (f" {default}" if default else "")


ROUTER_FLAGS = SettingsFlags(router_settings.ROUTER_SETTINGS, router_settings.flag_of, "router")
STRATEGY_FLAGS = SettingsFlags(strategy_settings.STRATEGY_SETTINGS, strategy_settings.flag_of, "strategy_params")


def with_settings_flags(*groups: SettingsFlags) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add one keyword parameter per setting of ``groups`` to a command (which takes them as ``**flags``)."""

    def add(command: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(command, eval_str=True)
        own = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        extra = [p for group in groups for p in group.parameters()]
        names = [p.name for p in own + extra]
        if len(set(names)) != len(names):
            raise ValueError(f"{command.__name__}: two flags share a parameter name in {names}")
        command.__signature__ = sig.replace(parameters=own + extra)
        command.__annotations__ = {**{p.name: p.annotation for p in own + extra}, "return": sig.return_annotation}
        return command

    return add


def router_choices() -> str:
    """``topk | expert-choice | …`` for ``--router``'s help."""
    return " | ".join(router_settings.ROUTER_SETTINGS)
