"""``ckptforge upcycle --config moe.yml`` / ``upcycle BASE --expert-source A --expert-source B`` (issue 14).

Thin: builds the :class:`~ckptforge.multisource.MoESpec`, calls the library, renders the result.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

from ckptforge.config import parse_size
from ckptforge.errors import UsageError
from ckptforge.multisource import MoESpec, load_moe_config, plan_multisource, upcycle_multisource
from ckptforge.multisource.recipe import spec_from_recipe
from ckptforge.multisource.spec import DTYPE_NAMES, ExpertSpec, native_spec
from ckptforge.multisource.verify import verify_multisource

from .options import byte_progress, emit_json, fail_verification, show_progress, stderr, stdout, rich_table

if TYPE_CHECKING:
    from ckptforge.recipes import Recipe

#: upcycle flags a multi-source run reads; any other flag the user typed is refused.
APPLIES = {"source", "out", "top_k", "layers", "seed", "dtype", "shard_size", "force", "dry_run", "as_json", "quiet",
           "verify", "tol",
           "moe_config", "expert_source", "shared_expert", "gate_mode", "architecture", "no_prompts_in_card", "recipe"}
#: upcycle flags ``--shared-expert carved`` reads.
CARVE_APPLIES = {"source", "out", "experts", "top_k", "layers", "seed", "dtype", "shard_size", "force", "as_json",
                 "quiet", "verify", "tol", "calibration", "calib_samples", "calib_batch_size", "router_init",
                 "router_init_std", "shared_expert"}
_GIVEN = ("COMMANDLINE", "ENVIRONMENT")


def run_multisource(ctx: Any, p: dict[str, Any]) -> None:
    """The multi-source path of ``upcycle``: ``p`` holds its parameters by name."""
    given = {n for n in ctx.params if (s := ctx.get_parameter_source(n)) is not None and s.name in _GIVEN}
    if list(p["shared_expert"] or []) == ["carved"] and not p["expert_source"] and p["moe_config"] is None:
        return _run_carve(p, given)
    refused = sorted(given - APPLIES)
    if refused:
        flags = ", ".join("--" + n.replace("_", "-") for n in refused)
        verb = "does" if len(refused) == 1 else "do"
        raise UsageError(f"{flags} {verb} not apply to a multi-source MoE (--config / --expert-source); drop it")
    recipe = _recipe(p)
    spec = _spec(p, given, recipe)
    defaults = recipe.options if recipe is not None else {}
    layers = p["layers"] if "layers" in given else defaults.get("layers", "all")
    seed = p["seed"] if "seed" in given else defaults.get("seed", p["seed"])
    record = _recipe_record(recipe, p, given)
    try:
        size = parse_size(p["shard_size"])
    except ValueError as exc:
        raise UsageError(f"--shard-size: {exc}") from None
    if p["dry_run"]:
        ms = plan_multisource(spec, p["out"], layers=layers, seed=seed, shard_size=size, recipe=record)
        ms.sources.close()
        payload = {"dry_run": True, "plan": ms.to_dict(prompts=not p["no_prompts_in_card"])}
        emit_json(payload) if p["as_json"] else _render(payload["plan"])
        return
    if p["out"] is None:
        raise UsageError("--out is required to write a checkpoint (or use --dry-run)")
    with warnings.catch_warnings(record=True), byte_progress(0, "writing", show_progress(p["quiet"], p["as_json"])) as progress:
        warnings.simplefilter("ignore")
        result = upcycle_multisource(spec, p["out"], layers=layers, seed=seed, shard_size=size, force=p["force"],
                                     prompts_in_card=not p["no_prompts_in_card"], progress=progress, recipe=record)
    for w in result.warnings:
        stderr.print(f"warning: {w}", markup=False, highlight=False)
    report = verify_multisource(result.out, tol=p["tol"], seed=seed) if p["verify"] else None
    payload = {"out": str(result.out), "seconds": round(result.seconds, 3),
               "plan": result.plan.to_dict(prompts=not p["no_prompts_in_card"]), "files": result.files,
               "verify": report.to_dict() if report is not None else None, "warnings": result.warnings}
    if p["as_json"]:
        emit_json(payload)
    elif not p["quiet"]:
        _render(payload["plan"])
        stdout.print(f"wrote [bold]{result.out}[/] ({len(result.files)} files) in {result.seconds:.1f} s")
        if report is not None:
            from .verify import render_report

            render_report(report)
    if report is not None and not report.passed:
        fail_verification(f"an expert differs from its source's FFN above tolerance {p['tol']:g}; the output was "
                          f"written to {result.out}", p["as_json"])


def _run_carve(p: dict[str, Any], given: set[str]) -> None:
    """``upcycle SOURCE --shared-expert carved --calibration DATA``: a CMoE-style carved shared expert."""
    from ckptforge.multisource.carve import carve_shared_expert
    from ckptforge.verify import verify_model

    refused = sorted(given - CARVE_APPLIES)
    if refused:
        flags = ", ".join("--" + n.replace("_", "-") for n in refused)
        raise UsageError(f"{flags} {'does' if len(refused) == 1 else 'do'} not apply to --shared-expert carved; drop it")
    if p["source"] is None or not p["calibration"] or p["out"] is None:
        raise UsageError("--shared-expert carved needs SOURCE, --calibration DATA (which units fire most) and --out DIR")
    try:
        size = parse_size(p["shard_size"])
    except ValueError as exc:
        raise UsageError(f"--shard-size: {exc}") from None
    with byte_progress(0, "writing", show_progress(p["quiet"], p["as_json"])) as progress:
        record = carve_shared_expert(
            p["source"], p["out"], num_experts=p["experts"], top_k=p["top_k"], calibration=p["calibration"],
            layers=p["layers"], calib_samples=p["calib_samples"], calib_batch_size=p["calib_batch_size"],
            router_init=p["router_init"], router_init_std=p["router_init_std"], seed=p["seed"], dtype=p["dtype"],
            shard_size=size, force=p["force"], progress=progress)
    report = verify_model(p["out"], p["source"], tol=p["tol"]) if p["verify"] else None
    payload = {"out": str(p["out"]), "seconds": record["seconds"], "plan": record["plan"], "files": record["files"],
               "verify": report.to_dict() if report is not None else None}
    if p["as_json"]:
        emit_json(payload)
    elif not p["quiet"]:
        stdout.print(f"wrote [bold]{p['out']}[/]: {record['plan']['num_experts']} routed experts of "
                     f"{record['plan']['expert_width']} units + a shared expert of {record['plan']['shared_expert_width']}")
    if report is not None and not report.passed:
        fail_verification(f"verification above tolerance {p['tol']:g}; the output was written to {p['out']}", p["as_json"])


def _recipe(p: dict[str, Any]) -> Recipe | None:
    """The multi-source recipe of ``--recipe`` (issue 14); a single-source one is refused here."""
    if p["recipe"] is None:
        return None
    from ckptforge.recipes import load_recipe

    recipe = load_recipe(p["recipe"])
    if recipe.multisource is None:
        raise UsageError(f"recipe '{recipe.name}' describes a single-source conversion; drop --expert-source / "
                         "--shared-expert / --config, or use a recipe with a multisource field")
    if p["moe_config"] is not None:
        raise UsageError(f"--config and recipe '{recipe.name}' both describe the MoE; use one of them")
    return recipe


def _recipe_record(recipe: Recipe | None, p: dict[str, Any], given: set[str]) -> dict[str, Any] | None:
    """What ckptforge.json records about the recipe: where it came from, its values, the typed overrides."""
    if recipe is None:
        return None
    typed = ("source", "expert_source", "shared_expert", "top_k", "dtype", "gate_mode", "architecture", "layers", "seed")
    return {"name": recipe.name, "path": str(recipe.path), "sha256": recipe.sha256, "method": recipe.method,
            "paper": recipe.paper, "family": recipe.family,
            "values": {"options": recipe.options, "multisource": recipe.multisource},
            "overrides": {k: p[k] for k in typed if k in given}}


def _spec(p: dict[str, Any], given: set[str], recipe: Recipe | None = None) -> MoESpec:
    dtype = None if p["dtype"] == "auto" else p["dtype"]
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise UsageError(f"--dtype {dtype!r} is not one of auto, float32, float16, bfloat16")
    if "carved" in (p["shared_expert"] or []):
        raise UsageError("--shared-expert carved splits the base's own FFN and takes no other shared experts, "
                         "--expert-source or --config; use it alone with SOURCE and --calibration")
    shared = tuple(ExpertSpec("" if s == "dense" else s) for s in p["shared_expert"] or [])
    if recipe is not None:  # SOURCE and --expert-source fill in (or replace) the recipe's models
        spec = spec_from_recipe(recipe.multisource, base=p["source"], expert_sources=p["expert_source"],
                                origin=f"recipe '{recipe.name}'")
        overrides = {"experts_per_token": p["top_k"] if "top_k" in given else None, "dtype": dtype,
                     "gate_mode": p["gate_mode"], "architecture": p["architecture"]}
    elif p["moe_config"] is not None:
        if p["source"] is not None or p["expert_source"]:
            raise UsageError("--config names the base and the experts itself; drop SOURCE and --expert-source")
        spec = load_moe_config(p["moe_config"])
        overrides = {"experts_per_token": p["top_k"] if "top_k" in given else None, "dtype": dtype,
                     "gate_mode": p["gate_mode"], "architecture": p["architecture"]}
    else:
        if p["source"] is None:
            raise UsageError("--expert-source needs the base model as SOURCE: ckptforge upcycle BASE --expert-source A …")
        if not p["expert_source"]:
            raise UsageError("--shared-expert needs experts: add --expert-source once per expert")
        spec = native_spec(p["source"], list(p["expert_source"]), gate_mode=p["gate_mode"], top_k=p["top_k"],
                           dtype=dtype, architecture=p["architecture"])
        overrides = {}
    if shared:
        overrides["shared_experts"] = spec.shared_experts + tuple(
            ExpertSpec(e.source_model or spec.base_model) for e in shared)
    from dataclasses import replace

    return replace(spec, **{k: v for k, v in overrides.items() if v is not None})


def _render(plan: dict[str, Any]) -> None:
    table = rich_table(title=f"plan: {plan['source']} → {plan['output_format']} ({plan['architecture']})", show_header=False)
    ms = plan["multisource"]
    for key in ("num_layers", "hidden_size", "intermediate_size", "moe_layers", "num_experts", "top_k"):
        table.add_row(key, str(plan[key]))
    table.add_row("gate mode", ms["gate_mode"])
    for i, e in enumerate(ms["experts"]):
        table.add_row(f"expert {i}", e["source_model"])
    for i, e in enumerate(ms["shared_experts"]):
        table.add_row(f"shared expert {i}", e["source_model"])
    table.add_row("params total / active", f"{plan['params_total']:,} / {plan['params_active']:,}")
    table.add_row("bytes to write", f"{plan['bytes_to_write']:,} in {len(plan['shards'])} shard(s)")
    stdout.print(table)
