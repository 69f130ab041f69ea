"""Streaming, atomic writer of sharded safetensors checkpoints.

The header of each shard is known from the plan before any data exists, so tensors are written
as they are produced (in chunks, e.g. one expert at a time) instead of holding a shard in memory:
``safetensors.torch.save_file`` needs the whole dict. The format written is the safetensors
format (8-byte little-endian header length, JSON header, raw little-endian data); reading is
left to the ``safetensors`` library. Each file's sha256 is computed while writing.

    >>> with AtomicOutput(Path("out/m"), force=False) as tmp:           # doctest: +SKIP
    ...     digest = write_shard(tmp / "model.safetensors", specs, chunks)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

from ckptforge.errors import OutputExistsError

_DTYPE_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
_TMP_MARK = ".ckptforge-tmp-"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


def shard_header(specs: list[TensorSpec], metadata: dict[str, str] | None = None) -> bytes:
    """The safetensors header (length prefix included) for tensors written in ``specs`` order."""
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": _DTYPE_CODES[spec.dtype], "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    body = json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    return len(body).to_bytes(8, "little") + body


def write_shard(path: Path, specs: list[TensorSpec], chunks: Iterable[Iterator[torch.Tensor]]) -> str:
    """Write one shard: ``chunks`` yields, per spec, an iterator of tensors whose bytes concatenate
    to that tensor (one piece, or e.g. one expert after another). Returns the file's sha256.

    The file write runs in a second thread while this one hashes the same bytes (both release
    the GIL), with at most two pieces in flight. The file is not fsynced here: :class:`AtomicOutput`
    syncs every file once all are written, so the kernel flushes a shard while the next is written.
    """
    digest = hashlib.sha256()
    with open(path, "wb", buffering=0) as f, ThreadPoolExecutor(max_workers=1) as pool:
        in_flight: deque[Future] = deque()

        def put(data: object) -> None:
            while len(in_flight) >= 2:
                in_flight.popleft().result()
            in_flight.append(pool.submit(_write_all, f, data))
            digest.update(data)

        put(shard_header(specs))
        for spec, pieces in zip(specs, chunks, strict=True):
            written = 0
            for piece in pieces:
                if piece.dtype != spec.dtype:
                    piece = piece.to(spec.dtype)
                data = piece.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
                put(data)
                written += data.nbytes
            if written != spec.nbytes:
                raise RuntimeError(f"tensor {spec.name}: wrote {written} bytes, planned {spec.nbytes}")
        while in_flight:
            in_flight.popleft().result()
    return digest.hexdigest()


def _write_all(f, data) -> None:
    """Write every byte of ``data`` to the unbuffered file ``f`` (raw writes may be partial)."""
    view = memoryview(data).cast("B")
    while view:
        view = view[f.write(view):]


def write_index(path: Path, weight_map: dict[str, str], total_size: int) -> None:
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    path.write_text(json.dumps(index, indent=2) + "\n")


class AtomicOutput:
    """Context manager: a temporary sibling directory that becomes ``out`` only on success.

    An existing ``out`` is refused unless ``force``. On any error — and after a SIGKILL — nothing
    is left at ``out``; stale temporary siblings of dead processes are removed on the next run.
    """

    def __init__(self, out: Path, force: bool = False):
        self.out = Path(out)
        self.force = force
        self.tmp = self.out.parent / f".{self.out.name}{_TMP_MARK}{os.getpid()}"

    def check(self) -> None:
        if self.out.exists() and not self.force:
            raise OutputExistsError(f"output '{self.out}' already exists; pass --force to replace it or choose another --out")

    def __enter__(self) -> Path:
        self.check()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(self.out)
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        for path in sorted(self.tmp.iterdir()):
            _fsync_path(path)
        _fsync_dir(self.tmp)
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.ckptforge-old-{os.getpid()}"
            os.rename(self.out, old)
        os.rename(self.tmp, self.out)
        _fsync_dir(self.out.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _remove_stale(out: Path) -> None:
    for sibling in out.parent.glob(f".{out.name}.ckptforge-*"):
        pid = sibling.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(sibling, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    if not sys.platform.startswith("win"):  # directories cannot be opened for fsync there
        _fsync_path(path)
