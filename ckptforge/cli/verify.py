"""``ckptforge verify``: prove a conversion against its dense model."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ckptforge.errors import UsageError

from .options import JsonOpt, QuietOpt, SeedOpt, TolOpt, emit_json, fail_verification, stdout, rich_table

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

    from ckptforge.multisource.verify import is_multisource, verify_multisource  # issue 14

    if is_multisource(moe_dir):  # issue 14: each expert against its own source
        if against is not None:
            raise UsageError("--against does not apply to a multi-source output: each expert is checked against "
                             "the source named in ckptforge.json; drop --against")
        report = verify_multisource(moe_dir, tol=tol, seed=seed)
    else:
        report = verify_model(moe_dir, against, tol=tol, batch_size=batch_size, seed=seed)
    if as_json:
        emit_json(report.to_dict())
    elif not quiet:
        render_report(report)
    if not report.passed:
        fail_verification(f"verification above tolerance {tol:g} (final relative error {report.final.relative:.3e})", as_json)


def render_report(report: VerifyReport) -> None:
    table = rich_table("output", "max abs error", "relative error", title=f"verify {report.moe_dir} vs {report.against}")
    for layer, e in report.layers.items():
        table.add_row(f"layer {layer}", f"{e.max_abs:.3e}", f"{e.relative:.3e}")
    table.add_row("final", f"{report.final.max_abs:.3e}", f"{report.final.relative:.3e}")
    stdout.print(table)
    for layer, shares in getattr(report, "routing", {}).items():  # issue 14: multi-source outputs
        stdout.print(f"layer {layer}: share of each expert's prompt tokens routed to it: "
                     + ", ".join("—" if s is None else f"{s:.2f}" for s in shares))
    verdict = "[green]passed[/]" if report.passed else "[red]above tolerance[/]"
    stdout.print(f"{verdict} (tol {report.tol:g}, {report.inputs})")
