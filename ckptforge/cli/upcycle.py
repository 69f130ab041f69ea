"""``ckptforge upcycle``: dense checkpoint → MoE checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from ckptforge.errors import UsageError
from ckptforge.config import SLOT_ROUTER_STRATEGY

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

if TYPE_CHECKING:  # the library (and torch) load when the command runs, not for --help
    from ckptforge.config import UpcycleOptions
    from ckptforge.plan import Plan


@with_router_flags
def upcycle(
    ctx: typer.Context,
    source: Annotated[str | None, typer.Argument(help="Dense checkpoint: path, directory, alias or Hub id org/name[@rev] (the base with --expert-source; omitted with --config).")] = None,
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
    # --- issue 14: multi-source MoE (mergekit-moe configs) ---
    moe_config: Annotated[Path | None, typer.Option("--config", help="A mergekit-moe YAML (base_model, gate_mode, experts, …), run unchanged; SOURCE is then omitted.")] = None,
    expert_source: Annotated[list[str] | None, typer.Option("--expert-source", help="Expert e's FFN from this model (repeat once per expert); SOURCE gives attention, norms, embeddings and head.")] = None,
    shared_expert: Annotated[list[str] | None, typer.Option("--shared-expert", help="A Qwen2-MoE shared expert from this model, 'dense' for the base's own FFN (repeatable: one wider shared FFN), or 'carved' (with --calibration, no --expert-source): the most active units shared, the rest partitioned into --experts.")] = None,
    gate_mode: Annotated[str | None, typer.Option("--gate-mode", help="Router rows: random (default with --expert-source) | uniform_random | cheap_embed | hidden | hidden_avg (prompt modes need --config).")] = None,
    architecture: Annotated[str | None, typer.Option("--architecture", help="Multi-source output: mixtral | qwen2_moe | qwen3_moe (default: the family's choice).")] = None,
    no_prompts_in_card: Annotated[bool, typer.Option("--no-prompts-in-card", help="Record each expert's prompts as a count and sha256, not the text.")] = False,
    # --- end issue 14 ---
    # --- issue 13: cross-size recycling (MoE Jetpack) ---
    teacher: Annotated[str | None, typer.Option("--teacher", help="Slice the experts from this wider dense checkpoint of the same family: hidden units by --strategy (default importance), channels by importance at its FFN input (needs --calibration). A SOURCE that is a config only (config.json, no weights) gets every weight sliced from it.")] = None,
    **router_flags: Any,
) -> None:
    """Convert a dense checkpoint into a Mixture-of-Experts checkpoint."""
    if moe_config is not None or expert_source or shared_expert:  # issue 14 (imported lazily: --help stays fast)
        from .multisource import run_multisource

        return run_multisource(ctx, locals())
    if source is None:  # issue 14
        raise UsageError("SOURCE is required: ckptforge upcycle SOURCE --out DIR (or --config moe.yml for a multi-source MoE)")
    if gate_mode or architecture or no_prompts_in_card:  # issue 14
        raise UsageError("--gate-mode, --architecture and --no-prompts-in-card apply to a multi-source MoE; "
                         "add --expert-source or --config")
    if push_to is not None:  # issue 11: a bad repo id is refused before converting
        from ckptforge.hub import check_repo_id

        check_repo_id(push_to)
    if not dry_run and out is not None:  # issue 15: hash the source on the idle core while torch imports
        from ckptforge.io.hashing import local_source_files, prehash

        prehash(local_source_files(source))
    from ckptforge.config import UpcycleOptions, parse_size, router_settings
    from ckptforge.cross_size_student import open_student
    from ckptforge.plan import build_plan

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
        teacher=teacher,  # issue 13
    )
    if recipe is not None:  # issue 6
        options = apply_recipe(ctx, recipe, options)
    ckpt = open_student(source, options.teacher)  # issue 12: opened and planned once; issue 13: config-only STUDENT
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
    from ckptforge.execute import upcycle as run_upcycle  # after --dry-run: it imports transformers

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
