"""The ``ckptforge`` command line: thin Typer commands plus one error → exit-code table.

Every command takes ``--json``; errors are one line (``CKPTFORGE_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from types import ModuleType
from typing import Any

import typer

from ckptforge.errors import CkptforgeError
from ckptforge.import_hooks import when_imported
from ckptforge.interrupt import restore as restore_interrupts

from . import compare as compare_cmd
from . import finetune as finetune_cmd  # issue 5: finetune
from . import inspect as inspect_cmd
from . import routes as routes_cmd
from . import upcycle as upcycle_cmd
from . import verify as verify_cmd
from . import docs as docs_cmd, push as push_cmd, recipes as recipes_cmd  # issue 6
from . import eval as eval_cmd  # issue 13: eval
from .errors import BAD_USAGE, INTERRUPTED, exit_code_for, message_for
from .options import emit_json

#: click's base exception as typer raises it (recent typer vendors click as ``typer._click``).
_CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
#: What a group run without a command raises (its message is the group's help).
_NO_ARGS = getattr(sys.modules[_CLICK_ERROR.__module__], "NoArgsIsHelpError", ())



class _Group(typer.core.TyperGroup):
    """The root group; its ``--help`` reads False when absent (typer leaves it None, and coercing that
    None imports pydantic, ~0.1 s of every command's start-up, ``<command> --help`` included)."""

    def get_help_option(self, ctx: typer.Context) -> Any:
        option = super().get_help_option(ctx)
        if option is not None:
            option.default = False
        return option


#: Help is click's plain text: typer's rich panels cost ~0.2 s of CPU per ``--help`` (rich.markdown,
#: rich.traceback and the rendering of ~70 options), more than the rest of the start-up (issue 15).
HELP_MARKUP = None

app = typer.Typer(
    cls=_Group, name="ckptforge", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    rich_markup_mode=HELP_MARKUP,
    help="Turn dense checkpoints into Mixture-of-Experts checkpoints, and prove they are right.",
)
app.command()(upcycle_cmd.upcycle)
app.command()(verify_cmd.verify)
app.command()(inspect_cmd.inspect)
app.command("compare-strategies")(compare_cmd.compare)
app.command()(finetune_cmd.finetune)  # issue 5: finetune
app.command()(routes_cmd.routes)
app.command("eval")(eval_cmd.eval_model)  # issue 13: eval
app.command()(push_cmd.push); app.add_typer(recipes_cmd.app, name="recipes", cls=_Group); app.command(hidden=True)(docs_cmd.docs)  # issue 6


def _version(value: bool) -> None:
    if value:
        from ckptforge import __version__

        typer.echo(f"ckptforge {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Turn dense checkpoints into Mixture-of-Experts checkpoints, and prove they are right."""


def _quiet_transformers(transformers: ModuleType) -> None:
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _quiet_libraries() -> None:
    """Silence transformers once a command imports it (``--help`` never does: it stays fast)."""
    when_imported("transformers", _quiet_transformers)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code (the console script exits with it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in argv
    try:
        restore_interrupts()  # from here Ctrl-C unwinds (temporary outputs are removed) and is reported below
        _quiet_libraries()
        result = app(args=argv, prog_name="ckptforge", standalone_mode=False)
        if result == INTERRUPTED:  # typer turns a KeyboardInterrupt inside a command into Exit(130)
            return _fail(KeyboardInterrupt("interrupted"), INTERRUPTED, as_json)
        return result if isinstance(result, int) else 0
    except CkptforgeError as exc:
        return _fail(exc, exit_code_for(exc), as_json)
    except (typer.Abort, KeyboardInterrupt):  # issue 11: Ctrl-C anywhere is one line and 130
        return _fail(KeyboardInterrupt("interrupted"), INTERRUPTED, as_json)
    except _NO_ARGS as exc:  # `ckptforge` or `ckptforge recipes` alone: the help on stderr, exit 2
        print(exc.format_message(), file=sys.stderr)
        return BAD_USAGE
    except _CLICK_ERROR as exc:
        return _fail(exc, BAD_USAGE, as_json, message=f"error: {exc.format_message()}; see --help")


def interrupted() -> int:
    """Say so in one line and return the exit code of an interrupted run (128 + SIGINT)."""
    print("error: interrupted", file=sys.stderr)
    return INTERRUPTED


def _fail(exc: BaseException, code: int, as_json: bool, message: str | None = None) -> int:
    message = message or message_for(exc)
    if os.environ.get("CKPTFORGE_DEBUG") == "1":
        traceback.print_exception(exc, file=sys.stderr)
    if as_json:
        report = getattr(exc, "report", None)
        payload = {"error": message.removeprefix("error: "), "exit_code": code}
        if report is not None and hasattr(report, "to_dict"):
            payload["report"] = report.to_dict()
        emit_json(payload)
    print(message, file=sys.stderr)
    return code


def run() -> None:
    """Console-script entry point; a Ctrl-C even while an error is reported exits 130 quietly."""
    try:
        code = main()
    except KeyboardInterrupt:
        code = interrupted()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the command has finished: a Ctrl-C while Python exits changes nothing
    sys.exit(code)
