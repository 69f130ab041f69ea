"""``ckptforge routes``: where the router sends each patch or token."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .options import JsonOpt, emit_json, stdout, rich_table


def routes(
    model: Annotated[Path, typer.Argument(help="An upcycled vit_moe / bert_moe directory.")],
    input_path: Annotated[Path, typer.Option("--input", "-i", help="An image (ViT) or a text file (BERT).")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="PNG path; one file per MoE layer: NAME-layerN.png.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Show each MoE layer's top expert per patch/token and the expert load (dead experts in red)."""
    from ckptforge.routes import route_input, save_expert_maps

    report = route_input(model, input_path)
    if out is not None:
        save_expert_maps(report, out)
    if as_json:
        emit_json(report.to_dict())
        return
    table = rich_table("token", *[f"layer {i}" for i in report.layers], title=f"routes ({report.router}) of {input_path}")
    for t, token in enumerate(report.tokens):
        table.add_row(token, *[str(r.top_expert[t]) for r in report.layers.values()])
    stdout.print(table)
    for i, r in report.layers.items():
        stdout.print(f"layer {i} load: {r.load}  dead experts: {r.dead_experts or 'none'}")
    for f in report.files:
        stdout.print(f"wrote {f}")
