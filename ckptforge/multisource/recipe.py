"""A recipe's ``multisource`` field: a multi-source MoE described as a method (issue 14).

The field holds mergekit-moe's schema (the keys of :class:`~ckptforge.multisource.spec.MoESpec`).
``base_model`` and each expert's ``source_model`` may be left out and given on the command line —
SOURCE, and ``--expert-source`` once per expert in the recipe's order — so a recipe can describe
the experts' roles (prompts, gate mode, architecture, shared experts) while the user brings the
fine-tunes. Flags the user types beat the recipe (``--gate-mode``, ``--architecture``,
``--top-k``, ``--dtype``, ``--layers``, ``--seed``, SOURCE, ``--expert-source``).

    >>> recipe_problems({"gate_mode": "random", "experts": [{}, {}]}, {"layers": "all"})
    []
    >>> spec = spec_from_recipe({"gate_mode": "random", "experts": [{}, {}]}, base="b", expert_sources=["x", "y"])
    >>> [e.source_model for e in spec.experts], spec.base_model
    (['x', 'y'], 'b')
"""

from __future__ import annotations

from typing import Any

from ckptforge.errors import PlanError, UsageError

from .spec import MoESpec

#: The recipe ``options`` a multi-source recipe may set (a multi-source run reads these beside the spec),
#: with the kind each must be.
RECIPE_OPTIONS: dict[str, type] = {"layers": str, "seed": int}


def recipe_problems(section: Any, options: dict[str, Any]) -> list[str]:
    """Every problem of a recipe's ``multisource`` field and of its ``options`` (field paths first)."""
    problems = [f"options.{key}: does not apply to a multi-source recipe; allowed: {', '.join(RECIPE_OPTIONS)} "
                "(experts per token, dtype and gate mode go in multisource)"
                for key in options if key not in RECIPE_OPTIONS]
    problems += [f"options.{key}: must be {'a string' if kind is str else 'an integer'}, not {type(value).__name__}"
                 for key, kind in RECIPE_OPTIONS.items() if key in options
                 and (value := options[key]) is not None and (isinstance(value, bool) or not isinstance(value, kind))]
    if not isinstance(section, dict):
        return problems + [f"multisource: must be a mapping of mergekit-moe keys (gate_mode, experts, …), "
                           f"not {type(section).__name__}"]
    data = dict(section)
    data.setdefault("base_model", "SOURCE")  # left to the command line
    experts = data.get("experts")
    if isinstance(experts, list):
        data["experts"] = [_with_source(e, f"--expert-source {i + 1}") for i, e in enumerate(experts)]
    try:
        spec = MoESpec.from_dict(data, "multisource")
    except PlanError as exc:
        return problems + [f"multisource: {p}" for p in exc.problems]
    if spec.num_experts:  # experts may be left to --expert-source entirely
        problems += [f"multisource: {p}" for p in spec.problems()]
    return problems


def spec_from_recipe(section: dict[str, Any], *, base: str | None, expert_sources: list[str] | None,
                     origin: str = "the recipe") -> MoESpec:
    """The spec a multi-source recipe describes, with SOURCE (``base``) and ``--expert-source`` on top."""
    data = dict(section)
    if base is not None:
        data["base_model"] = base
    experts = [e if isinstance(e, dict) else {"source_model": e} for e in data.get("experts") or []]
    if expert_sources:
        if experts and len(experts) != len(expert_sources):
            raise UsageError(f"{origin} lists {len(experts)} experts but {len(expert_sources)} --expert-source "
                             f"were given; pass one --expert-source per expert, in the recipe's order")
        experts = [{**e, "source_model": s} for e, s in zip(experts or [{}] * len(expert_sources), expert_sources)]
    data["experts"] = experts
    if not data.get("base_model"):
        raise UsageError(f"{origin} names no base_model; pass the base model as SOURCE")
    unnamed = [str(i) for i, e in enumerate(experts) if not e.get("source_model")]
    if unnamed or not experts:
        raise UsageError(f"{origin} leaves the experts' source models to the command line; pass --expert-source "
                         f"once per expert ({len(experts) or 'two or more'})")
    return MoESpec.from_dict(data, origin)


def _with_source(entry: Any, placeholder: str) -> Any:
    if isinstance(entry, dict) and not entry.get("source_model"):
        return {**entry, "source_model": placeholder}
    return entry
