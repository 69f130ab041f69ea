"""sha256 of files, optionally started early on a background thread and picked up later.

``ckptforge upcycle`` records the sha256 of its source files. Hashing them (2.2 GB for a
TinyLlama-size source) costs about as much CPU as importing torch, and while torch imports, the
second core of a small machine is idle: the CLI starts :func:`prehash` on the source's files before
its imports, and :func:`file_sha256` later takes the result — only if the file is still the same
(path, size, mtime, inode); otherwise it hashes again. Correctness never depends on the early start.

    >>> prehash([Path("model.safetensors")])          # doctest: +SKIP
    >>> file_sha256(Path("model.safetensors"))        # doctest: +SKIP
    'e3b0c442…'
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from concurrent.futures import Future
from pathlib import Path

_started: dict[tuple, Future] = {}
_lock = threading.Lock()


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    """sha256 of a file, read into one reused buffer (a fresh block per read fragmented the heap
    of a conversion hashing its source in the background: peak RSS grew with the model)."""
    h = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _identity(path: Path) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ino)


def prehash(paths: list[Path]) -> None:
    """Start hashing ``paths`` (one after another) on a daemon thread; missing files are skipped.
    Early hashes nobody took (e.g. a command that stopped at a bad option) are forgotten."""
    jobs = []
    with _lock:
        for key in [k for k, f in _started.items() if f.done()]:
            del _started[key]
        for path in paths:
            key = _identity(path)
            if key is not None and key not in _started:
                _started[key] = Future()
                jobs.append((path, _started[key]))
    if jobs:
        threading.Thread(target=_run, args=(jobs,), name="ckptforge-prehash", daemon=True).start()


def _run(jobs: list[tuple[Path, Future]]) -> None:
    for path, future in jobs:
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(sha256_file(path))
            except BaseException as exc:  # handed to whoever asks for this hash
                future.set_exception(exc)


def file_sha256(path: Path) -> str:
    """sha256 of ``path``: the early hash when :func:`prehash` started one on this same file."""
    key = _identity(path)
    with _lock:
        future = _started.pop(key, None) if key is not None else None
    if future is not None:
        try:
            digest = future.result()
        except OSError:
            digest = None
        if digest is not None and _identity(path) == key:  # unchanged while it was hashed
            return digest
    return sha256_file(path)


def local_source_files(ref: str) -> list[Path]:
    """The files ``upcycle`` will hash for a local source ``ref`` (its config.json and weights), as far
    as they can be told without parsing anything: a guess for :func:`prehash`, empty for Hub ids."""
    path = Path(ref)
    if path.is_file():
        return [path, path.parent / "config.json"]
    if not path.is_dir():
        return []
    index = path / "model.safetensors.index.json"
    names = ["model.safetensors"]
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        except (OSError, ValueError, AttributeError):
            return []
    return [path / "config.json", *(path / n for n in names if isinstance(n, str) and Path(n).name == n)]
