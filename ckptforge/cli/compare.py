"""``ckptforge compare-strategies``: one table to choose an expert-initialisation strategy."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from .options import CalibBatchOpt, CalibSamplesOpt, JsonOpt, SeedOpt, emit_json, stdout, rich_table
from .options import ExpertsOpt, LayersOpt, TopKOpt  # issue 12
from .settings_flags import STRATEGY_FLAGS, with_settings_flags

if TYPE_CHECKING:  # the library (and torch) load when the command runs, not for --help
    from ckptforge.compare import Comparison


@with_settings_flags(STRATEGY_FLAGS)  # issue 12: upcycle's strategy flags; each goes to the strategies that take it
def compare(
    source: Annotated[str, typer.Argument(help="Dense checkpoint: path, directory, alias or Hub id.")],
    calibration: Annotated[str, typer.Option("--calibration", help="Image folder, .txt/.jsonl file or dataset.")],
    experts: ExpertsOpt = 8,
    top_k: TopKOpt = 2,
    layers: LayersOpt = "every-2",
    strategies: Annotated[str | None, typer.Option("--strategies", help="Comma list (default: all).")] = None,
    heldout: Annotated[float, typer.Option("--heldout", help="Fraction of samples held out for the init gap.")] = 0.25,
    calib_samples: CalibSamplesOpt = 256,
    calib_batch_size: CalibBatchOpt = 16,
    seed: SeedOpt = 0,
    as_json: JsonOpt = False,
    **strategy_flags: Any,
) -> None:
    """Convert with every strategy and report init gap, expert overlap, coverage and time."""
    from ckptforge.compare import compare_strategies

    names = [s.strip() for s in strategies.split(",") if s.strip()] if strategies else None
    report = compare_strategies(source, calibration, num_experts=experts, top_k=top_k, layers=layers,
                                strategies=names, samples=calib_samples, batch_size=calib_batch_size,
                                heldout=heldout, seed=seed, strategy_params=STRATEGY_FLAGS.values(strategy_flags))
    if as_json:
        emit_json(report.to_dict())
    else:
        render(report)


def render(report: Comparison) -> None:
    cal = report.calibration
    table = rich_table("strategy", "width", "init gap", "overlap", "coverage", "seconds", title=(
        f"{report.source}: E={report.num_experts}, k={report.top_k}, layers {report.moe_layers}; "
        f"stats from {cal.get('samples')} samples of {cal.get('source')} ({report.stats_seconds:.1f} s), "
        f"gap on {report.heldout_samples} held out"))
    for r in report.rows:
        name = r.strategy + "".join(f" ({k}={v})" for k, v in r.params.items())
        if r.error:
            table.add_row(name, "—", f"[red]{r.error}[/]", "", "", "")
        else:
            table.add_row(name, str(r.expert_width), f"{r.init_gap:.4f}", f"{r.overlap:.3f}",
                          f"{r.coverage:.3f}", f"{r.seconds:.2f}")
    stdout.print(table)
    stdout.print("init gap: relative L2 error of the final output vs dense (lower is closer); "
                 "fine-tuning closes it.")
