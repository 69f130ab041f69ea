"""Option aliases shared by the commands (defined once) and output helpers."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Iterator

import typer

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout and nothing else.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or tables.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace a previous ckptforge output (or an empty directory); never other files.")]
TolOpt = Annotated[float, typer.Option("--tol", help="Largest relative L2 error that passes verification.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for every random choice; same seed, same bytes.")]
OutOpt = Annotated[Path | None, typer.Option("--out", "-o", help="Output directory (written atomically).")]

# --- shared by upcycle and compare-strategies (issue 12: defined once) ---
ExpertsOpt = Annotated[int, typer.Option("--experts", "-e", help="Experts per MoE layer (E).")]
TopKOpt = Annotated[int, typer.Option("--top-k", "-k", help="Experts per token (k).")]
LayersOpt = Annotated[str, typer.Option("--layers", help="all | every-N | last-N | last-P% | i,j,k (every-2: layers 1,3,5,…).")]

# --- calibration options (issue 3), shared by upcycle and compare-strategies; the strategy settings' flags are
# generated from ckptforge/strategy_settings.py (cli/settings_flags.py) ---
CalibrationOpt = Annotated[str | None, typer.Option(
    "--calibration", help="Calibration data: image folder, .txt/.jsonl file, or dataset id/dir.")]
CalibSamplesOpt = Annotated[int, typer.Option("--calib-samples", help="Calibration samples to use.")]
CalibBatchOpt = Annotated[int, typer.Option("--calib-batch-size", help="Calibration batch size.")]
StatsCacheOpt = Annotated[Path | None, typer.Option(
    "--stats-cache", help="File to save / reuse activation statistics (keyed by source + calibration).")]


class _Console:
    """rich's Console, made on first use: importing rich costs ~25 ms of CPU, and a cold page cache
    more, on every start-up, ``--help`` included (issue 15)."""

    def __init__(self, **settings: Any):
        self._settings: dict[str, Any] = settings
        self._console: Any = None

    def get(self) -> Any:
        """The ``rich.console.Console`` itself (made now if need be), e.g. for ``Progress(console=...)``."""
        if self._console is None:
            from rich.console import Console

            self._console = Console(**self._settings)
        return self._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self.get(), name)


stdout = _Console(soft_wrap=True)
stderr = _Console(stderr=True, soft_wrap=True)


def rich_table(*columns: str, **settings: Any) -> Any:
    """A ``rich.table.Table`` (rich imported here, when a command prints one)."""
    from rich.table import Table

    return Table(*columns, **settings)


def emit_json(payload: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")


def fail_verification(message: str, as_json: bool) -> None:
    """Exit 1 after a failed verification; in --json mode the report is already on stdout."""
    if as_json:
        print(f"error: {message}", file=sys.stderr)
        raise typer.Exit(1)
    from ckptforge.errors import VerificationFailed

    raise VerificationFailed(message)


def show_progress(quiet: bool, as_json: bool) -> bool:
    return not quiet and not as_json and sys.stderr.isatty()


@contextmanager
def byte_progress(total: int, description: str, enabled: bool) -> Iterator[Any]:
    """A rich progress bar over bytes on stderr; yields a callback taking the bytes just done."""
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), TimeRemainingColumn(), console=stderr.get(), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)
