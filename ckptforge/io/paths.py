"""Where a run may write: the one home of the output-path rules every command follows.

Every path is resolved once (``~``, ``..``, symlinks). A path a run writes — ``--out``, ``--save``,
``--report``, ``--stats-cache`` — may not be, contain, or lie inside anything the same run reads
(the source checkpoint, a comparison model, calibration or training data): writing there would
destroy the input while it is being read. ``--force`` replaces only a previous ckptforge output
(a directory holding ``ckptforge.json``) or an empty directory, never a folder of the user's files.

    >>> refuse_overlap("--out", "ckpt/moe", reads=["ckpt"])        # doctest: +SKIP
    Traceback (most recent call last):
    ckptforge.errors.UsageError: --out 'ckpt/moe' lies inside 'ckpt', which this run reads; ...
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterable

from ckptforge.errors import DiskSpaceError, OutputExistsError, UsageError

#: The file that marks a directory as a ckptforge output (provenance and file hashes).
OUTPUT_MARKER = "ckptforge.json"


def real(path: str | os.PathLike[str]) -> Path:
    """``path`` absolute, with ``~`` expanded and symlinks and ``..`` resolved (missing parts kept)."""
    return Path(os.path.expanduser(os.fspath(path))).resolve(strict=False)


def local_paths(refs: Iterable[str | os.PathLike[str] | None]) -> list[Path]:
    """The refs that name existing local files or directories (Hub ids and dataset ids drop out)."""
    out = []
    for ref in refs:
        if ref is None or not os.fspath(ref):
            continue
        path = Path(os.path.expanduser(os.fspath(ref)))
        if path.exists():
            out.append(path)
    return out


def refuse_overlap(flag: str, target: str | os.PathLike[str], reads: Iterable[str | os.PathLike[str]],
                   role: str = "reads") -> Path:
    """Raise :class:`UsageError` when ``target`` is, contains or lies inside a path in ``reads``
    (paths this run ``role``: reads, or writes elsewhere). Returns the resolved ``target``."""
    t = real(target)
    for read in reads:
        r = real(read)
        if t == r:
            why = f"is a path this run {role}"
        elif r in t.parents:
            why = f"lies inside '{read}', which this run {role}"
        elif t in r.parents:
            why = f"contains '{read}', which this run {role}"
        else:
            continue
        raise UsageError(f"{flag} '{target}' {why}; writing there would destroy it: choose a path outside "
                         "the run's inputs and outputs")
    return t


def check_writable(flag: str, target: str | os.PathLike[str]) -> Path:
    """Raise :class:`UsageError` unless ``target`` could be created: a non-empty path whose existing
    ancestors are directories and whose nearest existing ancestor is writable. Returns it resolved."""
    if not os.fspath(target).strip():
        raise UsageError(f"{flag} is empty; pass a path")
    t = real(target)
    here = real(".")
    if t == here or t in here.parents:
        raise UsageError(f"{flag} '{target}' is the current directory or contains it; pass a new directory's path")
    parent = t.parent
    while not parent.exists():
        if parent.is_symlink():
            raise UsageError(f"{flag} '{target}': '{parent}' is a broken symlink; choose another path")
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{flag} '{target}': '{parent}' is a file, not a directory; choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} '{target}': directory '{parent}' is not writable; choose another path")
    return t


def check_replaceable(flag: str, out: str | os.PathLike[str], force: bool) -> None:
    """Refuse an existing output directory unless ``force``; with ``force``, refuse anything that is
    neither a previous ckptforge output nor an empty directory."""
    path = Path(out)
    if not path.exists() and not path.is_symlink():
        return
    if not force:
        raise OutputExistsError(f"output '{out}' already exists; pass --force to replace it or choose another --out")
    if not path.is_dir():
        raise UsageError(f"{flag} '{out}' is a file, not a ckptforge output; --force replaces only a previous "
                         "output directory: choose another path")
    if not (path / OUTPUT_MARKER).is_file() and any(path.iterdir()):
        raise UsageError(f"{flag} '{out}' holds files but no {OUTPUT_MARKER}, so it is not a ckptforge output; "
                         "--force replaces only a previous output or an empty directory: choose another path")


def check_output(flag: str, out: str | os.PathLike[str], *, force: bool = False,
                 reads: Iterable[str | os.PathLike[str]] = ()) -> Path:
    """All the rules for an output directory written atomically: creatable, not an input, and
    replaced only when it is a previous output and ``force``. Returns it resolved.

        >>> check_output("--out", "out/moe", force=True, reads=["dense/"])   # doctest: +SKIP
    """
    t = check_writable(flag, out)
    refuse_overlap(flag, out, reads)
    check_replaceable(flag, out, force)
    return t


#: Figure files ckptforge writes with matplotlib (``eval --out``, ``routes --out``), by suffix.
FIGURE_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")


def check_figure_file(flag: str, target: str | os.PathLike[str], reads: Iterable[str | os.PathLike[str]] = ()) -> Path:
    """:func:`check_output_file` for a plot, whose suffix must also be one of :data:`FIGURE_SUFFIXES`."""
    suffix = Path(os.fspath(target)).suffix.lower()
    if suffix not in FIGURE_SUFFIXES:
        raise UsageError(f"{flag} '{target}' is not a figure file; end it in {' | '.join(FIGURE_SUFFIXES)}")
    return check_output_file(flag, target, reads)


def check_output_file(flag: str, target: str | os.PathLike[str], reads: Iterable[str | os.PathLike[str]] = (),
                      writes: Iterable[str | os.PathLike[str]] = ()) -> Path:
    """The rules for a single file a run writes (``--stats-cache``, a PNG): creatable, its
    directory exists, not a directory itself, not an input and not inside another output
    (``writes``). Returns it resolved."""
    t = check_writable(flag, target)
    if t.is_dir():
        raise UsageError(f"{flag} '{target}' is a directory; pass a file path")
    if not t.parent.is_dir():
        raise UsageError(f"{flag} '{target}': directory '{t.parent}' does not exist; create it first")
    refuse_overlap(flag, target, reads)
    refuse_overlap(flag, target, writes, role="writes")
    return t


def free_bytes(out: Path) -> int:
    """Free disk where ``out`` will be written (its nearest existing ancestor's file system)."""
    probe = real(out).parent
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


def check_free_disk(out: Path, needed: int) -> int:
    """The free bytes at ``out``; :class:`DiskSpaceError` (exit 2) when ``needed`` bytes do not fit."""
    free = free_bytes(out)
    if free < needed:
        raise DiskSpaceError(f"not enough free disk at {real(out).parent}: the output needs {needed / 1e9:.2f} GB, "
                             f"{free / 1e9:.2f} GB free; free space or choose another --out")
    return free
