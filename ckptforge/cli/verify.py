"""``ckptforge verify``: prove a conversion against its dense model."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from .options import JsonOpt, QuietOpt, SeedOpt, TolOpt, emit_json, fail_verification, stdout

if TYPE_CHECKING:  # the library (and torch) load when the command runs, not for --help
    from ckptforge.verify import VerifyReport


def verify(
    moe_dir: Annotated[Path, typer.Argument(help="A ckptforge output directory.")],
    against: Annotated[str | None, typer.Option("--against", help="Dense source (default: the one in ckptforge.json).")] = None,
    tol: TolOpt = 1e-5,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Inputs per check.")] = 2,
    seed: SeedOpt = 0,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Run the dense and the MoE model on the same inputs; exit 1 above --tol."""
    from ckptforge.verify import verify_model

    report = verify_model(moe_dir, against, tol=tol, batch_size=batch_size, seed=seed)
    if as_json:
        emit_json(report.to_dict())
    elif not quiet:
        render_report(report)
    if not report.passed:
        fail_verification(f"verification above tolerance {tol:g} (final relative error {report.final.relative:.3e})", as_json)


def render_report(report: VerifyReport) -> None:
    table = Table("output", "max abs error", "relative error", title=f"verify {report.moe_dir} vs {report.against}")
    for layer, e in report.layers.items():
        table.add_row(f"layer {layer}", f"{e.max_abs:.3e}", f"{e.relative:.3e}")
    table.add_row("final", f"{report.final.max_abs:.3e}", f"{report.final.relative:.3e}")
    stdout.print(table)
    verdict = "[green]passed[/]" if report.passed else "[red]above tolerance[/]"
    stdout.print(f"{verdict} (tol {report.tol:g}, {report.inputs})")
