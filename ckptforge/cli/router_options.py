"""The router flags of ``upcycle``, generated from the settings classes in ``ckptforge/moe/settings.py``.

Each settings field becomes one flag (``--`` + name, or the field's ``flag``); a field several
routers share (``capacity_factor``) is one flag whose help lists each router's meaning and default.
A new router setting is one field there; its flag, help and ``docs/cli.md`` entry follow from it.
"""

from __future__ import annotations

import inspect
import typing
from typing import Annotated, Any, Callable

import typer

from ckptforge.moe.settings import ROUTER_SETTINGS, flag_of, setting_defaults


def router_flag_params() -> dict[str, str]:
    """Python parameter name of each router flag → the router setting it sets (``router_noise`` → ``noise_std``)."""
    return {flag_of(name)[2:].replace("-", "_"): name for name in setting_defaults()}


def _type_of(name: str) -> type:
    for cls in ROUTER_SETTINGS.values():
        hints = typing.get_type_hints(cls)
        if name in hints:
            args = [a for a in typing.get_args(hints[name]) if a is not type(None)]
            return args[0] if args else hints[name]
    raise KeyError(name)


def _help(entries: list[tuple[str, Any, str]]) -> str:
    groups: dict[tuple[str, str], list[str]] = {}
    for kind, default, text in entries:
        shown = "" if default is None else f" (default {default})"
        groups.setdefault((text, shown), []).append(kind)
    return "; ".join(f"{'/'.join(kinds)}: {text}{shown}" for (text, shown), kinds in groups.items()) + "."


def _parameters() -> list[inspect.Parameter]:
    params = []
    for pname, name in router_flag_params().items():
        kind = _type_of(name)
        flag = flag_of(name)
        decls = [f"{flag}/--no-{flag[2:]}"] if kind is bool else [flag]
        option = typer.Option(*decls, help=_help(setting_defaults()[name]))
        params.append(inspect.Parameter(pname, inspect.Parameter.KEYWORD_ONLY, default=None,
                                        annotation=Annotated[kind | None, option]))
    return params


def with_router_flags(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add one keyword parameter per router setting to ``command`` (which takes them as ``**router_flags``)."""
    sig = inspect.signature(command, eval_str=True)
    own = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    extra = _parameters()
    command.__signature__ = sig.replace(parameters=own + extra)
    command.__annotations__ = {**{p.name: p.annotation for p in own + extra}, "return": sig.return_annotation}
    return command


def router_choices() -> str:
    """``topk | expert-choice | …`` for ``--router``'s help."""
    return " | ".join(ROUTER_SETTINGS)
