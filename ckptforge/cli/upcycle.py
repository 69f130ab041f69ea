"""``ckptforge upcycle``: dense checkpoint → MoE checkpoint."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from ckptforge.config import SLOT_ROUTER_STRATEGY, UpcycleOptions, parse_size, router_settings
from ckptforge.errors import UsageError
from ckptforge.execute import upcycle as run_upcycle
from ckptforge.io.source import open_checkpoint
from ckptforge.plan import Plan, build_plan

from .push import push_output
from .recipes import apply_recipe
from .router_options import router_choices, router_flag_params, with_router_flags
from .options import (
    CalibBatchOpt, CalibrationOpt, CalibSamplesOpt, ExpertRatioOpt, ExpertWidthOpt, ImportanceScoreOpt, MetricOpt,
    ModeOpt, OutputScaleOpt, PartsOpt, StatsCacheOpt, ThresholdOpt, subset_params,
)
from .options import (  # issue 12: shared with compare-strategies
    ExpertsOpt, LayersOpt, TopKOpt,
)
from .options import (
    ForceOpt, JsonOpt, OutOpt, QuietOpt, SeedOpt, TolOpt, byte_progress, emit_json, fail_verification, show_progress,
    stderr, stdout,
)


@with_router_flags
def upcycle(
    ctx: typer.Context,
    source: Annotated[str, typer.Argument(help="Dense checkpoint: path, directory, alias or Hub id org/name[@rev].")],
    out: OutOpt = None,
    experts: ExpertsOpt = 8,
    top_k: TopKOpt = 2,
    layers: LayersOpt = "every-2",
    strategy: Annotated[str | None, typer.Option("--strategy", "-s", help=f"Expert initialisation strategy (default copy-all; soft/sphero with --calibration: {SLOT_ROUTER_STRATEGY}).")] = None,
    noise_std: Annotated[float, typer.Option("--noise-std", help="copy-all: Gaussian noise std on expert weights.")] = 0.0,
    drop_ratio: Annotated[float, typer.Option("--drop-ratio", help="copy-all: Drop-Upcycling re-draw ratio (0.5 in the paper).")] = 0.0,
    router_init: Annotated[str, typer.Option("--router-init", help="normal (std --router-init-std) | zeros | centroid (from --calibration).")] = "normal",
    router_init_std: Annotated[float, typer.Option("--router-init-std", help="Std of the normal router init.")] = 0.02,
    # --- strategy and calibration options (issue 3) ---
    expert_width: ExpertWidthOpt = None,
    expert_ratio: ExpertRatioOpt = None,
    metric: MetricOpt = None,
    coactivation_mode: ModeOpt = None,
    parts: PartsOpt = None,
    threshold: ThresholdOpt = None,
    output_scale: OutputScaleOpt = None,
    importance_score: ImportanceScoreOpt = None,
    calibration: CalibrationOpt = None,
    calib_samples: CalibSamplesOpt = 256,
    calib_batch_size: CalibBatchOpt = 16,
    stats_cache: StatsCacheOpt = None,
    # --- end strategy options ---
    seed: SeedOpt = 0,
    dtype: Annotated[str, typer.Option("--dtype", help="auto (keep) | float32 | bfloat16 | float16.")] = "auto",
    shard_size: Annotated[str, typer.Option("--shard-size", help="Largest shard, e.g. 5GB, 500MB.")] = "5GB",
    force: ForceOpt = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan and write nothing.")] = False,
    verify: Annotated[bool, typer.Option("--verify", help="Verify against the dense model before finishing.")] = False,
    tol: TolOpt = 1e-5,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    # --- routers (issue 4; issue 12: the router setting flags are generated from ckptforge/moe/settings.py) ---
    router: Annotated[str, typer.Option("--router", help=router_choices() + ".")] = "topk",
    core_experts: Annotated[int | None, typer.Option("--core-experts", help="sphero: core experts (same as --experts).")] = None,
    # --- issue 6: recipes and Hub push ---
    recipe: Annotated[str | None, typer.Option("--recipe", help="A recipe name (ckptforge recipes list) or YAML path; explicit flags override its values.")] = None,
    push_to: Annotated[str | None, typer.Option("--push-to", help="After a successful conversion (and verify, if asked), push the output to this Hub repo id.")] = None,
    # --- issue 12: the card's base_model ---
    base_model: Annotated[str | None, typer.Option("--base-model", help="Hub repo id to name as the card's base_model (default: the Hub repo the source came from, if any).")] = None,
    **router_flags: Any,
) -> None:
    """Convert a dense checkpoint into a Mixture-of-Experts checkpoint."""
    try:
        size = parse_size(shard_size)
    except ValueError as exc:
        raise UsageError(f"--shard-size: {exc}") from None
    names = router_flag_params()
    settings = router_settings(router, **{names[k]: v for k, v in router_flags.items()})
    strategy_params = {"noise_std": noise_std or None, "drop_ratio": drop_ratio or None, **subset_params(
        expert_width, expert_ratio, metric, coactivation_mode, parts, threshold, output_scale, importance_score)}
    options = UpcycleOptions(
        num_experts=core_experts or experts, top_k=top_k, layers=layers, strategy=strategy, router=settings,
        strategy_params={k: v for k, v in strategy_params.items() if v is not None},
        router_init=router_init, router_init_std=router_init_std, seed=seed, dtype=dtype, shard_size=size,
        calibration=calibration, calib_samples=calib_samples, calib_batch_size=calib_batch_size,
        stats_cache=str(stats_cache) if stats_cache else None,
    )
    if recipe is not None:  # issue 6
        options = apply_recipe(ctx, recipe, options)
    ckpt = open_checkpoint(source)  # issue 12: opened and planned once
    plan = build_plan(ckpt, options, out)
    _say_data_free(options, plan)
    if dry_run:
        if as_json:
            emit_json({"dry_run": True, "plan": plan.to_dict(), "options": options.to_dict(), "recipe": options.recipe})
        else:
            render_plan(plan)
        return
    if out is None:
        raise UsageError("--out is required to write a checkpoint (or use --dry-run)")
    with byte_progress(plan.bytes_to_write, "writing", show_progress(quiet, as_json)) as progress:
        result = run_upcycle(ckpt, out, options, force=force, verify=verify, tol=tol, progress=progress, plan=plan,
                             base_model=base_model)
    _report(result, options, push_to, as_json, quiet, tol)


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
    table = Table(title=f"plan: {d['source']} → {d['output_format']} ({d['architecture']})", show_header=False)
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
    moe = Table("MoE tensor", "shape", "dtype", title="MoE tensors (first layer)")
    first = plan.moe_layers[0] if plan.moe_layers else None
    for t in d["moe_tensors"]:
        if first is not None and (f"layers.{first}." in t["name"] or f"layer.{first}." in t["name"]):
            moe.add_row(t["name"], "×".join(map(str, t["shape"])), t["dtype"])
    stdout.print(moe)
