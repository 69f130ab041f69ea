"""``ckptforge eval``: held-out accuracy / loss, and the capacity sweep of top-k routers."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from .options import JsonOpt, QuietOpt, SeedOpt, emit_json, stdout, rich_table

if TYPE_CHECKING:  # the library (and torch) load when the command runs, not for --help
    from ckptforge.evaluate import EvalReport


def eval_model(
    model: Annotated[str, typer.Argument(help="An MoE output or a dense source (path, alias or Hub id).")],
    data: Annotated[str, typer.Option("--data", help="Eval data: class folders, .txt/.jsonl file, saved dataset dir or Hub dataset id.")],
    capacity_factor: Annotated[str | None, typer.Option(
        "--capacity-factor", help="Top-k routers: sweep these capacity factors C, e.g. 0.25,0.5,1,2 (one row each, after a no-capacity row).")] = None,
    bpr: Annotated[bool | None, typer.Option(
        "--bpr/--no-bpr", help="With --capacity-factor: only BPR on / off (default: both).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Examples per forward; capacity is per batch of tokens.")] = 32,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per text example.")] = 64,
    held_out: Annotated[bool, typer.Option("--held-out", help="Only the 10% of DATA that finetune --data DATA --seed SEED held out.")] = False,
    seed: SeedOpt = 0,
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda.")] = "auto",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write a PNG of the metric against FLOPs (BPR and no BPR side by side).")] = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Evaluate a model on held-out data; with --capacity-factor, the V-MoE capacity sweep."""
    from ckptforge.evaluate import EvalOptions, evaluate, parse_capacity_factors, plot_sweep
    from ckptforge.io.paths import check_figure_file, local_paths

    if out is not None:  # before the evaluation: never over the model or the data (issue 11)
        check_figure_file("--out", out, reads=local_paths([model, data]))

    options = EvalOptions(
        data=data, capacity_factors=parse_capacity_factors(capacity_factor) if capacity_factor is not None else None,
        bpr=bpr, batch_size=batch_size, seq_len=seq_len, held_out=held_out, seed=seed, device=device,
    )
    report = evaluate(model, options)
    if out is not None:
        report.plot = str(plot_sweep([report], out))
    if as_json:
        emit_json(report.to_dict())
    elif not quiet:
        render_report(report)


def render_report(report: EvalReport) -> None:
    table = rich_table("capacity C", "BPR", f"eval {report.metric}", "eval loss" if report.higher_is_better else "accuracy",
                       "GFLOPs / example", "expert MFLOPs / example", "assignments kept",
                       title=f"eval {report.model} on {report.data['source']} ({report.data['eval_examples']} examples)")
    for r in report.rows:
        other = r.loss if report.higher_is_better else r.accuracy
        table.add_row(
            "none" if r.capacity_factor is None else f"{r.capacity_factor:g}",
            "-" if r.bpr is None else ("on" if r.bpr else "off"),
            f"{report.value(r):.4f}", f"{other:.4f}", f"{r.flops_per_example / 1e9:.4f}",
            "-" if r.expert_flops_per_example is None else f"{r.expert_flops_per_example / 1e6:.3f}",
            "-" if r.kept_assignments is None else f"{r.kept_assignments:.3f}",
        )
    stdout.print(table)
    if report.plot:
        stdout.print(f"wrote {report.plot}")
