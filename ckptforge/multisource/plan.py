"""Plan a multi-source MoE: the single-source plan of the base, with every expert, router and
shared-expert tensor taken from where the spec says. Pure: nothing is read but headers.

    >>> ms = plan_multisource(load_moe_config("moe.yml"), Path("out"))     # doctest: +SKIP
    >>> ms.plan.to_dict()["architecture"]                                    # doctest: +SKIP
    'MixtralForCausalLM'
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptforge.config import UpcycleOptions, parse_layers
from ckptforge.errors import PlanError
from ckptforge.families import Family, OutputFormat, detect_family
from ckptforge.plan import Plan, build_plan

from .sources import Sources, check_sources, open_sources
from .spec import DTYPE_NAMES, MoESpec

#: Output formats whose MoE block has a (single, sigmoid-gated) shared expert, and its tensor roles.
SHARED_EXPERT_ROLES = {
    "mlp.shared_expert.gate_proj.weight": "gate",
    "mlp.shared_expert.up_proj.weight": "up",
    "mlp.shared_expert.down_proj.weight": "down",
    "mlp.shared_expert_gate.weight": "shared_gate",
}


@dataclass
class MultiSourcePlan:
    """The base's plan (tensors, config, shards) plus the spec and the opened sources it follows."""

    spec: MoESpec
    plan: Plan
    family: Family
    sources: Sources
    recipe: dict[str, Any] | None = None  # the recipe it came from: name, sha256, values, overrides

    def to_dict(self, prompts: bool = True) -> dict[str, Any]:
        return {**self.plan.to_dict(), "strategy": "multi-source", "multisource": self.spec.to_dict(prompts),
                "recipe": self.recipe}


def plan_multisource(spec: MoESpec, out: Path | None = None, *, layers: str = "all", seed: int = 0,
                     shard_size: int = 5 * 10**9, recipe: dict[str, Any] | None = None) -> MultiSourcePlan:
    """Validate ``spec`` and every source against the base (all problems together) and lay out the output.

    ``recipe`` (name, family, sha256, values, overrides) is checked against the base's family and recorded."""
    problems = spec.problems()
    sources = open_sources(spec)
    try:
        base = sources.base
        family = detect_family(base.config)
        dims = family.dims(base.config)
        try:
            moe_layers = parse_layers(layers, dims.num_layers)
        except ValueError as exc:
            problems.append(str(exc))
            moe_layers = []
        fmt, why = choose_format(spec, family, base.config, moe_layers, dims.num_layers)
        problems += why + family.check(base.config) + check_sources(spec, sources, family, moe_layers)
        if recipe is not None and recipe.get("family") != family.name:
            problems.insert(0, f"recipe '{recipe['name']}' is for {recipe['family']} checkpoints, but the base is a "
                               f"{family.name} checkpoint; use a {family.name} recipe or another base")
        if problems:
            raise PlanError(problems)
        options = UpcycleOptions(
            num_experts=spec.num_experts, top_k=spec.experts_per_token, layers=layers, strategy="copy-all",
            router_init="zeros", seed=seed, dtype=DTYPE_NAMES.get(spec.dtype or "", "auto"), shard_size=shard_size)
        width = dims.intermediate_size * len(spec.shared_experts)
        if width:
            fmt = _with_shared_width(fmt, width)
        plan = build_plan(base, options, out, output_format=fmt)
        if width:
            plan.output_config["shared_expert_intermediate_size"] = width
        return MultiSourcePlan(spec, plan, family, sources, recipe)
    except BaseException:
        sources.close()
        raise


def choose_format(spec: MoESpec, family: Family, config: dict[str, Any], moe_layers: list[int],
                  num_layers: int) -> tuple[OutputFormat | None, list[str]]:
    """The output format the spec asks for (mergekit's ``architecture``, matched by prefix as mergekit
    does: ``qwen`` → the family's Qwen format), or the family's own choice; problems otherwise."""
    model_type = config.get("model_type")
    if spec.architecture:
        asked = spec.architecture.lower().replace(" ", "_").replace("-", "_")
        offered = [n for n in family.offered_formats if n.startswith(asked)]
        if not offered:
            refused = [r for n, r in family.refused_formats.items() if n.startswith(asked)]
            if refused:
                return None, [f"architecture {spec.architecture}: " + refused[0].format(model_type=model_type)]
            names = ", ".join(family.offered_formats) or "none"
            return None, [f"architecture {spec.architecture!r} is not available for {model_type} sources; use one of: {names}"]
        fmt = family.offered_formats[offered[0]]
    else:
        fmt = family.output_format(config, moe_layers)
        if spec.shared_experts:
            fmt = next((f for f in family.offered_formats.values() if f.zeros), fmt)
    problems = []
    if fmt.name == "mixtral" and len(moe_layers) != num_layers:
        problems.append("architecture mixtral puts experts in every layer; drop --layers or use architecture qwen2_moe")
    if spec.shared_experts and not any(t.endswith(k) for t in fmt.zeros for k in SHARED_EXPERT_ROLES):
        problems.append(f"architecture {fmt.name} has no shared expert; remove shared_experts"
                        + (" or use architecture qwen2_moe" if "qwen2_moe" in family.offered_formats else ""))
    return fmt, problems


def _with_shared_width(fmt: OutputFormat, width: int) -> OutputFormat:
    """``fmt`` with its zero shared expert widened to ``width`` units (written from the shared sources)."""
    zeros = {}
    for template, shape_of in fmt.zeros.items():
        role = next((r for k, r in SHARED_EXPERT_ROLES.items() if template.endswith(k)), None)
        if role in ("gate", "up"):
            shape_of = lambda d, w=width: (w, d)  # noqa: E731
        elif role == "down":
            shape_of = lambda d, w=width: (d, w)  # noqa: E731
        zeros[template] = shape_of
    return dataclasses.replace(fmt, zeros=zeros)


def shared_role(name: str) -> str | None:
    """The shared-expert role of an output tensor name, or None."""
    return next((r for k, r in SHARED_EXPERT_ROLES.items() if name.endswith(k)), None)
