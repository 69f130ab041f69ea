"""``ckptforge upcycle``: dense checkpoint → MoE checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ckptforge.errors import UsageError
from ckptforge.config import SLOT_ROUTER_STRATEGY

from .push import push_output
from .recipes import apply_recipe
from .settings_flags import ROUTER_FLAGS, STRATEGY_FLAGS, router_choices, with_settings_flags
from .options import CalibBatchOpt, CalibrationOpt, CalibSamplesOpt, StatsCacheOpt, rich_table
from .options import (  # issue 12: shared with compare-strategies
    ExpertsOpt, LayersOpt, TopKOpt,
)
from .options import (
    ForceOpt, JsonOpt, OutOpt, QuietOpt, SeedOpt, TolOpt, byte_progress, emit_json, fail_verification, show_progress,
    stderr, stdout,
)

if TYPE_CHECKING:  # the library (and torch) load when the command runs, not for --help
    from ckptforge.config import UpcycleOptions
    from ckptforge.plan import Plan


@with_settings_flags(ROUTER_FLAGS, STRATEGY_FLAGS)  # issue 12: generated from the settings dataclasses
def upcycle(
    ctx: typer.Context,
    source: Annotated[str | None, typer.Argument(help="Dense checkpoint: path, directory, alias or Hub id org/name[@rev] (the base with --expert-source; omitted with --config).")] = None,
    out: OutOpt = None,
    experts: ExpertsOpt = 8,
    top_k: TopKOpt = 2,
    layers: LayersOpt = "every-2",
    strategy: Annotated[str | None, typer.Option("--strategy", "-s", help=f"Expert initialisation strategy (default copy-all; soft/sphero with --calibration: {SLOT_ROUTER_STRATEGY}).")] = None,
    router_init: Annotated[str, typer.Option("--router-init", help="normal (std --router-init-std) | zeros | centroid (from --calibration).")] = "normal",
    router_init_std: Annotated[float, typer.Option("--router-init-std", help="Std of the normal router init.")] = 0.02,
    calibration: CalibrationOpt = None,
    calib_samples: CalibSamplesOpt = 256,
    calib_batch_size: CalibBatchOpt = 16,
    stats_cache: StatsCacheOpt = None,
    seed: SeedOpt = 0,
    dtype: Annotated[str, typer.Option("--dtype", help="auto (keep) | float32 | bfloat16 | float16.")] = "auto",
    shard_size: Annotated[str, typer.Option("--shard-size", help="Largest shard, e.g. 5GB, 500MB.")] = "5GB",
    force: ForceOpt = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan and write nothing.")] = False,
    verify: Annotated[bool, typer.Option("--verify", help="Verify against the dense model before finishing.")] = False,
    tol: TolOpt = 1e-5,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    router: Annotated[str, typer.Option("--router", help=router_choices() + ".")] = "topk",
    core_experts: Annotated[int | None, typer.Option("--core-experts", help="sphero: core experts (same as --experts).")] = None,
    recipe: Annotated[str | None, typer.Option("--recipe", help="A recipe name (ckptforge recipes list) or YAML path; explicit flags override its values.")] = None,
    push_to: Annotated[str | None, typer.Option("--push-to", help="After a successful conversion (and verify, if asked), push the output to this Hub repo id.")] = None,
    base_model: Annotated[str | None, typer.Option("--base-model", help="Hub repo id to name as the card's base_model (default: the Hub repo the source came from, if any).")] = None,
    moe_config: Annotated[Path | None, typer.Option("--config", help="A mergekit-moe YAML (base_model, gate_mode, experts, …), run unchanged; SOURCE is then omitted.")] = None,
    expert_source: Annotated[list[str] | None, typer.Option("--expert-source", help="Expert e's FFN from this model (repeat once per expert); SOURCE gives attention, norms, embeddings and head.")] = None,
    shared_expert: Annotated[list[str] | None, typer.Option("--shared-expert", help="A Qwen2-MoE shared expert from this model, 'dense' for the base's own FFN (repeatable: one wider shared FFN), or 'carved' (with --calibration, no --expert-source): the most active units shared, the rest partitioned into --experts.")] = None,
    gate_mode: Annotated[str | None, typer.Option("--gate-mode", help="Router rows: random (default with --expert-source) | uniform_random | cheap_embed | hidden | hidden_avg (prompt modes need --config).")] = None,
    architecture: Annotated[str | None, typer.Option("--architecture", help="Multi-source output: mixtral | qwen2_moe | qwen3_moe (default: the family's choice).")] = None,
    no_prompts_in_card: Annotated[bool, typer.Option("--no-prompts-in-card", help="Record each expert's prompts as a count and sha256, not the text.")] = False,
    teacher: Annotated[str | None, typer.Option("--teacher", help="Slice the experts from this wider dense checkpoint of the same family: hidden units by --strategy (default importance), channels by importance at its FFN input (needs --calibration). A SOURCE that is a config only (config.json, no weights) gets every weight sliced from it.")] = None,
    **setting_flags: Any,
) -> None:
    """Convert a dense checkpoint into a Mixture-of-Experts checkpoint."""
    if moe_config is not None or expert_source or shared_expert or _multisource_recipe(recipe):  # issue 14 (lazy: --help stays fast)
        from .multisource import run_multisource

        return run_multisource(ctx, locals())
    options = upcycle_options(ctx, locals())
    from ckptforge.cross_size_student import open_student
    from ckptforge.plan import build_plan

    ckpt = open_student(source, options.teacher)  # issue 12: opened and planned once; issue 13: config-only STUDENT
    plan = build_plan(ckpt, options, out)
    _say_data_free(options, plan)
    if dry_run:
        return _render_dry_run(plan, options, as_json)
    if out is None:
        raise UsageError("--out is required to write a checkpoint (or use --dry-run)")
    from ckptforge.execute import upcycle as run_upcycle  # after --dry-run: it imports transformers

    with byte_progress(plan.bytes_to_write, "writing", show_progress(quiet, as_json)) as progress:
        result = run_upcycle(ckpt, out, options, force=force, verify=verify, tol=tol, progress=progress, plan=plan,
                             base_model=base_model)
    _report(result, options, push_to, as_json, quiet, tol)


def upcycle_options(ctx: typer.Context, p: dict[str, Any]) -> UpcycleOptions:
    """The :class:`UpcycleOptions` of ``upcycle``'s single-source path from its parameters ``p`` (by name):
    the flags checked, the router and strategy settings collected, the recipe (if any) beneath the typed flags."""
    if p["source"] is None:  # issue 14
        raise UsageError("SOURCE is required: ckptforge upcycle SOURCE --out DIR (or --config moe.yml for a multi-source MoE)")
    if p["gate_mode"] or p["architecture"] or p["no_prompts_in_card"]:  # issue 14
        raise UsageError("--gate-mode, --architecture and --no-prompts-in-card apply to a multi-source MoE; "
                         "add --expert-source or --config")
    if p["push_to"] is not None:  # issue 11: a bad repo id is refused before converting
        from ckptforge.hub import check_repo_id

        check_repo_id(p["push_to"])
    if not p["dry_run"] and p["out"] is not None:  # issue 15: hash the source on the idle core while torch imports
        from ckptforge.io.hashing import local_source_files, prehash

        prehash(local_source_files(p["source"]))
    from ckptforge.config import UpcycleOptions, parse_size, router_settings

    try:
        size = parse_size(p["shard_size"])
    except ValueError as exc:
        raise UsageError(f"--shard-size: {exc}") from None
    flags = p["setting_flags"]
    options = UpcycleOptions(
        num_experts=p["core_experts"] or p["experts"], top_k=p["top_k"], layers=p["layers"], strategy=p["strategy"],
        router=router_settings(p["router"], **ROUTER_FLAGS.values(flags)), strategy_params=STRATEGY_FLAGS.values(flags),
        router_init=p["router_init"], router_init_std=p["router_init_std"], seed=p["seed"], dtype=p["dtype"],
        shard_size=size, calibration=p["calibration"], calib_samples=p["calib_samples"],
        calib_batch_size=p["calib_batch_size"], stats_cache=str(p["stats_cache"]) if p["stats_cache"] else None,
        teacher=p["teacher"],  # issue 13
    )
    return apply_recipe(ctx, p["recipe"], options) if p["recipe"] is not None else options  # issue 6


def _render_dry_run(plan: Plan, options: UpcycleOptions, as_json: bool) -> None:
    if as_json:
        emit_json({"dry_run": True, "plan": plan.to_dict(), "options": options.to_dict(), "recipe": options.recipe})
    else:
        render_plan(plan)


def _multisource_recipe(ref: str | None) -> bool:
    """Issue 14: a recipe with a ``multisource`` field describes a multi-source MoE."""
    if ref is None:
        return False
    from ckptforge.recipes import load_recipe

    return load_recipe(ref).multisource is not None


def _say_data_free(options: UpcycleOptions, plan: Plan) -> None:
    """One stderr line (also with --quiet/--json) when the plan chose a data-free importance score."""
    score = plan.options.strategy_params.get("score")
    if score is not None and "score" not in options.strategy_params:
        stderr.print(f"note: no --calibration, so --strategy {plan.options.strategy} scores units from the "
                     f"weights (--importance-score {score}); pass --calibration PATH for activation scores")


def _report(result: Any, options: UpcycleOptions, push_to: str | None, as_json: bool, quiet: bool, tol: float) -> None:
    payload = {
        "out": str(result.out), "seconds": round(result.seconds, 3), "plan": result.plan.to_dict(),
        "files": result.files, "verify": result.verify.to_dict() if result.verify else None,
        "recipe": options.recipe,
    }
    verified = result.verify is None or result.verify.passed
    if push_to is not None and verified:  # issue 6: push only a conversion that passed
        payload["push"] = push_output(result.out, push_to, quiet=quiet or as_json)
    if as_json:
        emit_json(payload)
    elif not quiet:
        render_plan(result.plan)
        stdout.print(f"wrote [bold]{result.out}[/] ({len(result.files)} files) in {result.seconds:.1f} s")
        if result.verify is not None:
            from .verify import render_report

            render_report(result.verify)
    if result.verify is not None and not result.verify.passed:
        fail_verification(f"verification above tolerance {tol:g}; the output was written to {result.out}", as_json)


def render_plan(plan: Plan) -> None:
    d = plan.to_dict()
    table = rich_table(title=f"plan: {d['source']} → {d['output_format']} ({d['architecture']})", show_header=False)
    for key in ("family", "num_layers", "hidden_size", "intermediate_size", "moe_layers", "num_experts",
                "top_k", "expert_width", "strategy", "router", "router_init", "seed"):
        table.add_row(key, str(d[key]))
    table.add_row("params total / active", f"{d['params_total']:,} / {d['params_active']:,}")
    table.add_row("bytes to write", f"{d['bytes_to_write']:,} in {len(d['shards'])} shard(s)")
    if d["free_bytes"] is not None:
        table.add_row("free disk", f"{d['free_bytes']:,}")
    if d["dropped_tensors"]:
        table.add_row("not carried", ", ".join(d["dropped_tensors"][:6]) + (" …" if len(d["dropped_tensors"]) > 6 else ""))
    stdout.print(table)
    moe = rich_table("MoE tensor", "shape", "dtype", title="MoE tensors (first layer)")
    first = plan.moe_layers[0] if plan.moe_layers else None
    for t in d["moe_tensors"]:
        if first is not None and (f"layers.{first}." in t["name"] or f"layer.{first}." in t["name"]):
            moe.add_row(t["name"], "×".join(map(str, t["shape"])), t["dtype"])
    stdout.print(moe)
