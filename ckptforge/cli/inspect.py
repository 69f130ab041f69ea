"""``ckptforge inspect``: describe a checkpoint, or list the source aliases."""

from __future__ import annotations

from typing import Annotated

import typer

from ckptforge.errors import UsageError

from .options import JsonOpt, emit_json, stdout, rich_table


def inspect(
    source: Annotated[str | None, typer.Argument(help="Checkpoint path, directory, alias or Hub id.")] = None,
    aliases: Annotated[bool, typer.Option("--aliases", help="List the source aliases instead.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Show family, layers, sizes, MoE layout, parameters, dtypes and files of a checkpoint."""
    from ckptforge.inspection import inspect_source
    from ckptforge.io.source import ALIASES

    if aliases:
        if as_json:
            emit_json({"aliases": ALIASES})
        else:
            table = rich_table("alias", "Hub id", title="source aliases")
            for name, repo in ALIASES.items():
                table.add_row(name, repo)
            stdout.print(table)
        return
    if source is None:
        raise UsageError("inspect needs a SOURCE (or --aliases)")
    info = inspect_source(source)
    if as_json:
        emit_json(info)
        return
    table = rich_table(show_header=False, title=f"inspect {source}")
    for key, value in info.items():
        if key == "files":
            value = ", ".join(f"{n} ({s / 1e6:.1f} MB)" for n, s in value.items())
        elif isinstance(value, int) and key.startswith("params"):
            value = f"{value:,}"
        table.add_row(key, str(value))
    stdout.print(table)
