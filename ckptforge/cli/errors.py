"""The one table that turns library errors into a one-line message and an exit code.

Exit codes: 0 ok · 1 verification failed · 2 bad usage / bad input · 3 source missing or
unreadable · 4 Hub / network · 5 output exists (use --force).
"""

from __future__ import annotations

from ckptforge.errors import (
    CkptforgeError,
    HubError,
    OutputExistsError,
    SourceError,
    UsageError,
    VerificationFailed,
)
from ckptforge.interrupt import INTERRUPTED  # noqa: F401  (Ctrl-C: 130, re-exported for the CLI)


OK, VERIFY_FAILED, BAD_USAGE, SOURCE_UNREADABLE, HUB_FAILED, OUTPUT_EXISTS = 0, 1, 2, 3, 4, 5

#: Most specific first; the first class the error is an instance of decides.
EXIT_CODES: list[tuple[type[BaseException], int]] = [
    (VerificationFailed, VERIFY_FAILED),
    (OutputExistsError, OUTPUT_EXISTS),
    (HubError, HUB_FAILED),
    (SourceError, SOURCE_UNREADABLE),
    (UsageError, BAD_USAGE),
    (CkptforgeError, BAD_USAGE),
]


def exit_code_for(error: BaseException) -> int:
    for cls, code in EXIT_CODES:
        if isinstance(error, cls):
            return code
    raise TypeError(f"{type(error).__name__} is not a ckptforge error")


def message_for(error: BaseException) -> str:
    """One line: 'error: <problem and fix>'."""
    text = " ".join(str(error).split())
    return f"error: {text}"
