"""``ckptforge recipes list|show``: the shipped upcycling recipes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer


from .options import JsonOpt, emit_json, stdout, rich_table
from .settings_flags import ROUTER_FLAGS, STRATEGY_FLAGS

if TYPE_CHECKING:  # the library (and torch) load when a command runs, not for --help
    from ckptforge.config import UpcycleOptions

app = typer.Typer(no_args_is_help=True, help="List and show the shipped upcycling recipes (recipes/*.yaml).")


@app.command("list")
def list_recipes(as_json: JsonOpt = False) -> None:
    """Name, method, paper and a one-line summary of every shipped recipe."""
    from ckptforge.recipes import load_recipe, recipe_paths

    recipes = [load_recipe(p) for p in recipe_paths()]
    if as_json:
        emit_json({"recipes": [r.summary_dict() for r in recipes]})
        return
    table = rich_table(title="recipes")
    table.add_column("name", no_wrap=True)
    for column in ("method", "paper", "summary"):
        table.add_column(column)
    for r in recipes:
        missing = r.missing_components()
        note = f" [yellow](needs {', '.join(missing)})[/]" if missing else ""
        table.add_row(r.name, r.method, r.paper, r.summary + note)
    stdout.print(table)


@app.command("show")
def show_recipe(
    name: Annotated[str, typer.Argument(help="A shipped recipe name or a YAML path.")],
    as_json: JsonOpt = False,
) -> None:
    """Print one recipe: its YAML (with the comments that give source and arithmetic)."""
    from ckptforge.recipes import load_recipe

    recipe = load_recipe(name)
    if as_json:
        emit_json({**recipe.summary_dict(), "options": recipe.options, "sha256": recipe.sha256})
        return
    print(recipe.path.read_text(), end="")


#: upcycle flags whose option field has another name; (field, key) puts the value into a dict field.
#: A flag named like an UpcycleOptions field needs no entry; the router and strategy setting flags
#: are derived from their settings classes.
FLAG_FIELDS: dict[str, str | tuple[str, str]] = {
    "experts": "num_experts", "core_experts": "num_experts", "router": ("router", "type"),
    **{param: (group.target, name) for group in (ROUTER_FLAGS, STRATEGY_FLAGS) for param, name in group.params().items()},
}
_GIVEN = ("COMMANDLINE", "ENVIRONMENT")  # by name: typer may bring its own click enum


def explicit_overrides(ctx: Any, options: UpcycleOptions) -> dict[str, Any]:
    """The option values the user typed as flags (not defaults), keyed by UpcycleOptions field."""
    option_fields = set(options.to_dict()) - {"recipe"}
    overrides: dict[str, Any] = {}
    for name in ctx.params:
        source = ctx.get_parameter_source(name)
        if source is None or source.name not in _GIVEN:
            continue
        target = FLAG_FIELDS.get(name, name if name in option_fields else None)
        if isinstance(target, tuple):
            field_name, key = target
            value = getattr(options, field_name).get(key)
            if value is not None:
                overrides.setdefault(field_name, {})[key] = value
        elif target is not None:
            overrides[target] = getattr(options, target)
    return overrides


def apply_recipe(ctx: Any, ref: str, options: UpcycleOptions) -> UpcycleOptions:
    """Options from the recipe ``ref`` with the explicitly given flags on top."""
    from ckptforge.recipes import load_recipe, resolve_options

    return resolve_options(load_recipe(ref), explicit_overrides(ctx, options), base=options)
