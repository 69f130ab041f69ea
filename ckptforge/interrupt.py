"""Ctrl-C while the command line starts: one line and exit 130, not a traceback from deep inside
an import (issue 11). Standard library only: it runs before anything heavy is imported.

The ``ckptforge`` console script and ``python -m ckptforge`` install :func:`quiet_start_up` as
the first thing the package does; :func:`ckptforge.cli.main` then installs :func:`_interrupt`, so
from then on Ctrl-C raises KeyboardInterrupt, cleans up (temporary output directories) and the
CLI reports it in one line — except while a module is being imported (commands import torch and
transformers lazily): libraries turn an exception raised inside their imports into an ImportError
(numpy: "cannot load module more than once per process"; transformers: "Could not import module"),
so there the handler removes what ckptforge is writing (:func:`cleanup_on_interrupt`) and exits 130
with one line, as during start-up.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

#: The exit status of an interrupted run (the shell's 128 + SIGINT).
INTERRUPTED = 130


def _exit_quietly(signum: int, frame: object) -> None:
    sys.stderr.write("error: interrupted\n")
    sys.stderr.flush()
    os._exit(INTERRUPTED)  # nothing has been written yet; unwinding an import would print a traceback


#: What to undo when Ctrl-C ends the process without unwinding (a temporary output directory).
_CLEANUPS: list[Callable[[], None]] = []


@contextmanager
def cleanup_on_interrupt(cleanup: Callable[[], None]) -> Iterator[None]:
    """Run ``cleanup`` if Ctrl-C ends the process while this block runs (during an import, where
    unwinding is not possible); on a normal exit or an exception the caller cleans up itself."""
    _CLEANUPS.append(cleanup)
    try:
        yield
    finally:
        _CLEANUPS.remove(cleanup)


def _importing(frame: object) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib._bootstrap"):  # type: ignore[attr-defined]
            return True
        frame = frame.f_back  # type: ignore[attr-defined]
    return False


def _interrupt(signum: int, frame: object) -> None:
    """Ctrl-C once the command runs: KeyboardInterrupt, or a quiet exit inside an import."""
    if not _importing(frame):
        raise KeyboardInterrupt
    for cleanup in reversed(_CLEANUPS):
        try:
            cleanup()
        except Exception:  # noqa: BLE001 — the process is ending; the next run removes stale outputs
            pass
    _exit_quietly(signum, frame)


def _is_cli() -> bool:
    orig = list(getattr(sys, "orig_argv", []))
    as_module = "-m" in orig[:-1] and orig[orig.index("-m") + 1] == "ckptforge"
    script = os.path.basename(sys.argv[0] if sys.argv else "").removesuffix(".exe") == "ckptforge"
    return as_module or script


def quiet_start_up() -> None:
    """When this process is the ckptforge CLI, make Ctrl-C exit 130 with one line until
    :func:`restore` runs; a no-op for library users (their handler is left alone)."""
    if _is_cli() and threading.current_thread() is threading.main_thread():
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, _exit_quietly)


def restore() -> None:
    """Ctrl-C raises KeyboardInterrupt again (except inside an import, see above), if
    :func:`quiet_start_up` replaced Python's handler."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is _exit_quietly:
        signal.signal(signal.SIGINT, _interrupt)
