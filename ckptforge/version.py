"""The installed ckptforge version (its own module, so that library modules need not import the package).

Read on first use (``importlib.metadata`` costs ~25 ms of start-up): ``from ckptforge.version import
__version__`` and ``ckptforge.__version__`` both go through :func:`__getattr__`.
"""

from __future__ import annotations

from typing import Any


def installed_version() -> str:
    """The installed distribution's version, or ``0.0.0+unknown`` in a source tree that is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ckptforge")
    except PackageNotFoundError:
        return "0.0.0+unknown"


def __getattr__(name: str) -> Any:
    if name == "__version__":
        value = globals()[name] = installed_version()
        return value
    raise AttributeError(f"module 'ckptforge.version' has no attribute {name!r}")
