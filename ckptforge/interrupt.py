"""Ctrl-C while the command line starts: one line and exit 130, not a traceback from deep inside
an import (issue 11). Standard library only: it runs before anything heavy is imported.

The ``ckptforge`` console script and ``python -m ckptforge`` install :func:`quiet_start_up` as
the first thing the package does; :func:`ckptforge.cli.main` puts Python's own handler back, so
from then on Ctrl-C raises KeyboardInterrupt, cleans up (temporary output directories) and the
CLI reports it in one line.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

#: The exit status of an interrupted run (the shell's 128 + SIGINT).
INTERRUPTED = 130


def _exit_quietly(signum: int, frame: object) -> None:
    sys.stderr.write("error: interrupted\n")
    sys.stderr.flush()
    os._exit(INTERRUPTED)  # nothing has been written yet; unwinding an import would print a traceback


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
    """Python's own Ctrl-C handler (KeyboardInterrupt) again, if :func:`quiet_start_up` replaced it."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is _exit_quietly:
        signal.signal(signal.SIGINT, signal.default_int_handler)
