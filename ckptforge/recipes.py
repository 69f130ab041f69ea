"""Recipes: plain YAML files that name a published upcycling method and its settings.

A recipe maps onto :class:`~ckptforge.config.UpcycleOptions` fields; explicit CLI flags override
its values. Validation reports every problem at once, each with its field path.

    >>> recipe = load_recipe("mixtral-llama")
    >>> recipe.options["num_experts"], recipe.options["top_k"], recipe.options["layers"]
    (8, 2, 'all')
    >>> resolve_options(recipe, {"top_k": 1}).top_k
    1
"""

from __future__ import annotations

import dataclasses
import hashlib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ckptforge.config import UpcycleOptions
from ckptforge.errors import UsageError

#: The recipes shipped with ckptforge (``recipes/`` at the repository root).
RECIPE_DIR = Path(__file__).resolve().parents[1] / "recipes"

_REQUIRED = {"name": str, "method": str, "paper": str, "summary": str, "family": str, "options": dict}
#: Optional fields: ``multisource`` (issue 14) makes the recipe a multi-source MoE (mergekit-moe's schema).
_OPTIONAL = {"multisource": dict}
#: Options a recipe may not set: they describe the machine, not the method.
_NOT_IN_RECIPES = {"shard_size", "dtype", "recipe", "calibration", "stats_cache"}


class RecipeError(UsageError):
    """A recipe that does not validate; ``problems`` lists every one with its field path."""

    def __init__(self, source: str, problems: list[str]):
        self.problems = list(problems)
        super().__init__(f"recipe {source} is invalid: " + "; ".join(self.problems)
                         + "; fix these fields (see 'ckptforge recipes show mixtral-llama' for a valid one)")


@dataclass
class Recipe:
    """A validated recipe: what it is, and the option values it sets."""

    name: str
    method: str
    paper: str
    summary: str
    family: str
    options: dict[str, Any]
    path: Path
    sha256: str
    multisource: dict[str, Any] | None = None  # issue 14: see ckptforge.multisource.recipe

    def missing_components(self) -> list[str]:
        """Strategies / routers this recipe needs that this installation does not register.

            >>> load_recipe("mixtral-llama").missing_components()
            []
        """
        missing = []
        strategy = self.options.get("strategy")
        if strategy is not None and strategy not in available_strategies():
            missing.append(f"strategy '{strategy}'")
        router = (self.options.get("router") or {}).get("type")
        if router is not None and router not in available_routers():
            missing.append(f"router '{router}'")
        return missing

    def summary_dict(self) -> dict[str, Any]:
        return {"name": self.name, "method": self.method, "paper": self.paper, "summary": self.summary,
                "family": self.family, "path": str(self.path), "missing": self.missing_components()}


def available_strategies() -> set[str]:
    """Names in the strategy registry."""
    from ckptforge.strategies import STRATEGIES

    return set(STRATEGIES)


def available_routers() -> set[str]:
    """Router types the runtime MoE layers know (``ckptforge.moe.layer.ROUTER_TYPES``)."""
    from ckptforge.moe.layer import ROUTER_TYPES

    return set(ROUTER_TYPES)


def recipe_paths() -> list[Path]:
    """The shipped recipe files, sorted by name."""
    return sorted(RECIPE_DIR.glob("*.yaml"))


def load_recipe(ref: str | Path) -> Recipe:
    """Load and validate a recipe by shipped name (``sparse-upcycling-vit``) or by YAML path."""
    path = _find(ref)
    text = path.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise RecipeError(str(path), [f"not valid YAML{where}: {getattr(exc, 'problem', exc)}"]) from None
    problems = validate_recipe(data)
    if problems:
        raise RecipeError(str(path), problems)
    return Recipe(
        name=data["name"], method=data["method"], paper=data["paper"], summary=data["summary"],
        family=data["family"], options=dict(data["options"]), path=path,
        sha256=hashlib.sha256(text.encode()).hexdigest(), multisource=data.get("multisource"),
    )


def _find(ref: str | Path) -> Path:
    path = Path(ref).expanduser()
    if path.is_file():
        return path
    shipped = RECIPE_DIR / f"{ref}.yaml"
    if shipped.is_file():
        return shipped
    names = ", ".join(p.stem for p in recipe_paths())
    raise UsageError(f"recipe '{ref}' not found: not a file and not a shipped recipe; use one of {names} or a YAML path")


def validate_recipe(data: Any) -> list[str]:
    """Every problem of a parsed recipe, each starting with its field path (empty when valid).

        >>> validate_recipe({"name": "x", "options": {"num_experts": "8"}})[:2]
        ['method: missing (a string)', 'paper: missing (a string)']
    """
    if not isinstance(data, dict):
        return [f"(top level): must be a mapping of fields, not {type(data).__name__}"]
    problems = []
    for key, kind in _REQUIRED.items():
        if key not in data:
            problems.append(f"{key}: missing ({_kind_name(kind)})")
        elif not isinstance(data[key], kind):
            problems.append(f"{key}: must be {_kind_name(kind)}, not {type(data[key]).__name__}")
    known = set(_REQUIRED) | set(_OPTIONAL)
    problems += [f"{key}: unknown field; allowed: {', '.join(sorted(known))}" for key in data if key not in known]
    if isinstance(data.get("family"), str):
        problems += _family_problems(data["family"])
    if "multisource" in data:  # issue 14: the options a multi-source run reads, and its spec
        from ckptforge.multisource.recipe import recipe_problems

        problems += recipe_problems(data["multisource"], data["options"] if isinstance(data.get("options"), dict) else {})
    elif isinstance(data.get("options"), dict):
        problems += _option_problems(data["options"])
    return problems


def _family_problems(family: str) -> list[str]:
    from ckptforge.families import FAMILIES

    if family in FAMILIES:
        return []
    return [f"family: '{family}' is not a registered family; use one of {', '.join(FAMILIES)}"]


def _option_problems(options: dict[str, Any]) -> list[str]:
    defaults = UpcycleOptions().to_dict()
    allowed = sorted(set(defaults) - _NOT_IN_RECIPES)
    problems = []
    for key, value in options.items():
        path = f"options.{key}"
        if key not in allowed:
            problems.append(f"{path}: unknown option; allowed: {', '.join(allowed)}")
        elif not _same_kind(value, defaults[key]):
            problems.append(f"{path}: must be {_kind_name(type(defaults[key]))}, not {type(value).__name__}")
        elif defaults[key] is None and value is not None and not isinstance(value, kinds := _hinted_kinds(key)):
            problems.append(f"{path}: must be {' or '.join(map(_kind_name, kinds))}, not {type(value).__name__}")
    router = options.get("router")
    if isinstance(router, dict) and not isinstance(router.get("type"), str):
        problems.append("options.router.type: missing (a string such as topk)")
    elif isinstance(router, dict) and router["type"] in available_routers():
        from ckptforge.config import router_problems

        problems += [f"options.router: {p}" for p in router_problems(router)]
    if not problems:
        merged = UpcycleOptions(**{k: v for k, v in options.items()})
        problems += [f"options: {p}" for p in merged.problems()]
    return problems


def _same_kind(value: Any, default: Any) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    if default is None:
        return True
    return isinstance(value, type(default))


def _hinted_kinds(key: str) -> tuple[type, ...]:
    """The types an option whose default is None may take (its annotation, without None):
    ``teacher: 5`` is refused here instead of failing deep inside the conversion.

        >>> _hinted_kinds("teacher")
        (<class 'str'>,)
    """
    hint = typing.get_type_hints(UpcycleOptions)[key]
    return tuple(typing.get_origin(t) or t for t in typing.get_args(hint) or (hint,) if t is not type(None))


def _kind_name(kind: type) -> str:
    return {str: "a string", dict: "a mapping", int: "an integer", float: "a number", bool: "a boolean",
            list: "a list"}.get(kind, f"a {kind.__name__}")


def resolve_options(recipe: Recipe, overrides: dict[str, Any], base: UpcycleOptions | None = None) -> UpcycleOptions:
    """Recipe values on top of ``base`` (defaults), explicit ``overrides`` on top of the recipe.

    ``strategy_params`` and ``router`` are merged key by key; the resolved recipe (name, file hash,
    values, overrides) is recorded in the options so that it lands in ``ckptforge.json``.
    """
    base = base or UpcycleOptions()
    values = base.to_dict()
    for key, value in {**recipe.options, **overrides}.items():
        if key in ("strategy_params", "router") and key in recipe.options and key in overrides:
            value = {**recipe.options[key], **overrides[key]}
        values[key] = value
    if "strategy" in overrides and overrides["strategy"] != recipe.options.get("strategy"):
        values["strategy_params"] = dict(overrides.get("strategy_params", {}))
    if "strategy" not in overrides and "strategy" not in recipe.options:
        values["strategy"] = None  # the default follows the resolved router (UpcycleOptions)
    typed_router = overrides.get("router", {}).get("type")
    if typed_router is not None and typed_router != recipe.options.get("router", {}).get("type", "topk"):
        values["router"] = dict(overrides["router"])  # another router: none of the recipe's router settings apply
    values["recipe"] = {
        "name": recipe.name, "path": str(recipe.path), "sha256": recipe.sha256, "method": recipe.method,
        "paper": recipe.paper, "values": recipe.options, "overrides": overrides, "family": recipe.family,
    }
    field_names = {f.name for f in dataclasses.fields(UpcycleOptions)}
    return UpcycleOptions(**{k: v for k, v in values.items() if k in field_names})
