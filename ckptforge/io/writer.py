"""Streaming, atomic writer of sharded safetensors checkpoints.

The header of each shard is known from the plan before any data exists, so tensors are written
as they are produced (in chunks, e.g. one expert at a time) instead of holding a shard in memory:
``safetensors.torch.save_file`` needs the whole dict. The format written is the safetensors
format (8-byte little-endian header length, JSON header, raw little-endian data); reading is
left to the ``safetensors`` library. Each file's sha256 is computed while writing.

    >>> with AtomicOutput(Path("out/m"), force=False, reads=[Path("ckpt")]) as tmp:  # doctest: +SKIP
    ...     digest = write_shard(tmp / "model.safetensors", specs, chunks)
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sys
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from ckptforge.interrupt import cleanup_on_interrupt
from ckptforge.io.paths import check_output

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


def write_shard(path: Path, specs: list[TensorSpec], chunks: Iterable[Iterator[torch.Tensor]],
                direct: bool | None = None) -> str:
    """Write one shard: ``chunks`` yields, per spec, an iterator of tensors whose bytes concatenate
    to that tensor (one piece, or e.g. one expert after another). Returns the file's sha256.

    Large shards are written with ``O_DIRECT`` where the platform has it (see :func:`use_direct_io`;
    ``direct`` overrides that choice). Either way the bytes are hashed in one thread while another
    writes them. The file is not fsynced here: :class:`AtomicOutput` syncs every file once all are
    written.
    """
    header = shard_header(specs)
    if direct is None:
        direct = use_direct_io(len(header) + sum(s.nbytes for s in specs))
    sink = _DirectSink(path) if direct else _BufferedSink(path)
    try:
        sink.put(torch.frombuffer(bytearray(header), dtype=torch.uint8))
        for spec, pieces in zip(specs, chunks, strict=True):
            written = 0
            for piece in pieces:
                if piece.dtype != spec.dtype:
                    piece = piece.to(spec.dtype)
                data = _as_bytes(piece)
                sink.put(data)
                written += data.numel()
            if written != spec.nbytes:
                raise RuntimeError(f"tensor {spec.name}: wrote {written} bytes, planned {spec.nbytes}")
        return sink.finish()
    finally:
        sink.close()


#: Shards at least this large are written with O_DIRECT (when ``CKPTFORGE_DIRECT_IO`` is unset or ``auto``).
DIRECT_IO_MIN_BYTES = 64 << 20


def use_direct_io(nbytes: int) -> bool:
    """Whether a file of ``nbytes`` is written with ``O_DIRECT``: ``CKPTFORGE_DIRECT_IO=1`` always,
    ``0`` never, ``auto`` (default) for files of at least :data:`DIRECT_IO_MIN_BYTES`; never where
    the platform has no ``O_DIRECT``.

    Written through the page cache, every byte costs the kernel a copy (on a 2-core VM as much CPU
    as the hashing); written directly, the disk reads it from our staging buffer.
    """
    if not hasattr(os, "O_DIRECT"):
        return False
    mode = os.environ.get("CKPTFORGE_DIRECT_IO", "auto").strip().lower()
    if mode in ("1", "true", "yes", "on"):
        return True
    if mode in ("0", "false", "no", "off"):
        return False
    return nbytes >= DIRECT_IO_MIN_BYTES


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


class _BufferedSink:
    """Sequential writer of one file through the page cache that also computes its sha256
    (``put`` bytes, ``finish`` → hex digest, ``close``). Unbuffered ``write`` calls, at most two
    pieces in flight; the pieces are hashed here while a second thread writes them (both release
    the GIL)."""

    def __init__(self, path: Path):
        self.file = open(path, "wb", buffering=0)
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.in_flight: deque[Future] = deque()
        self.digest = hashlib.sha256()

    def put(self, data: torch.Tensor) -> None:
        array = data.numpy()
        while len(self.in_flight) >= 2:
            self.in_flight.popleft().result()
        self.in_flight.append(self.pool.submit(_write_all, self.file, array))
        self.digest.update(array)

    def finish(self) -> str:
        while self.in_flight:
            self.in_flight.popleft().result()
        return self.digest.hexdigest()

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.file.close()


class _DirectSink:
    """Like :class:`_BufferedSink`, with ``O_DIRECT`` writes from a ring of page-aligned staging buffers.

    The caller's thread copies bytes into the next free buffer; a full buffer goes to a hashing
    thread and a writing thread at once, and is reused when both are done. The last buffer is
    padded to the alignment with zeros, written, and the file truncated to its real length.
    Where the file system refuses ``O_DIRECT`` (at open or at the first write), the same bytes
    go through the page cache instead.
    """

    ALIGN = 4096
    BUFFER_BYTES = 16 << 20
    BUFFERS = 4

    def __init__(self, path: Path):
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        try:
            self.fd = os.open(path, flags | os.O_DIRECT, 0o644)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            self.fd = os.open(path, flags, 0o644)  # e.g. tmpfs has no O_DIRECT
        self.size = self.BUFFER_BYTES  # a multiple of ALIGN
        self.buffers = [_aligned_buffer(self.size, self.ALIGN) for _ in range(self.BUFFERS)]
        self.busy: list[tuple[Future, Future] | None] = [None] * self.BUFFERS
        self.hasher = ThreadPoolExecutor(max_workers=1)
        self.writer = ThreadPoolExecutor(max_workers=1)
        self.digest = hashlib.sha256()
        self.current, self.fill, self.offset = 0, 0, 0

    def put(self, data: torch.Tensor) -> None:
        # numpy's copy runs on this thread alone: torch's copy_ would start OpenMP workers whose
        # spin-waiting took the CPU the hashing thread needs (measured: 6 s more CPU per 12.9 GB)
        src = data.numpy()
        pos, n = 0, src.size
        while pos < n:
            take = min(n - pos, self.size - self.fill)
            np.copyto(self.buffers[self.current][self.fill:self.fill + take], src[pos:pos + take])
            self.fill += take
            pos += take
            if self.fill == self.size:
                self._submit(self.size)

    def _submit(self, valid: int) -> None:
        """Hash ``valid`` bytes of the current buffer and write them padded to the alignment."""
        array = self.buffers[self.current]
        padded = -(-valid // self.ALIGN) * self.ALIGN
        array[valid:padded] = 0
        self.busy[self.current] = (
            self.hasher.submit(self.digest.update, array[:valid]),
            self.writer.submit(_pwrite_all, self.fd, array[:padded], self.offset),
        )
        self.offset += valid
        self.current = (self.current + 1) % self.BUFFERS
        self.fill = 0
        self._wait(self.current)

    def _wait(self, i: int) -> None:
        if self.busy[i] is not None:
            for future in self.busy[i]:
                future.result()
            self.busy[i] = None

    def finish(self) -> str:
        if self.fill:
            self._submit(self.fill)
        for i in range(self.BUFFERS):
            self._wait(i)
        os.ftruncate(self.fd, self.offset)
        return self.digest.hexdigest()

    def close(self) -> None:
        self.hasher.shutdown(wait=True)
        self.writer.shutdown(wait=True)
        os.close(self.fd)


def _aligned_buffer(size: int, align: int) -> np.ndarray:
    raw = np.empty(size + align, dtype=np.uint8)
    start = -raw.ctypes.data % align
    return raw[start:start + size]


def _pwrite_all(fd: int, data, offset: int) -> None:
    """Write all of ``data`` at ``offset``; drops ``O_DIRECT`` from ``fd`` if the file system
    refuses it (EINVAL) and writes through the page cache."""
    view = memoryview(data).cast("B")
    while view:
        try:
            n = os.pwrite(fd, view, offset)
        except OSError as e:
            import fcntl  # O_DIRECT exists only where fcntl does

            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            if e.errno != errno.EINVAL or not flags & os.O_DIRECT:
                raise
            fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
            continue
        view, offset = view[n:], offset + n


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

    ``out`` follows :func:`ckptforge.io.paths.check_output`: an existing ``out`` is refused unless
    ``force`` and a previous output, and ``out`` may not overlap ``reads`` (every path the run reads:
    required, so no writer can forget its inputs; issue 11). On
    any error — and after a SIGKILL — nothing is left at ``out``; stale temporary siblings of dead
    processes are removed on the next run.
    """

    def __init__(self, out: Path, force: bool = False, *, reads: Iterable[Path], flag: str = "--out"):
        self.out = Path(out)
        self.force = force
        self.reads = list(reads)
        self.flag = flag
        self.tmp = self.out.parent / f".{self.out.name}{_TMP_MARK}{os.getpid()}"

    def check(self) -> None:
        check_output(self.flag, self.out, force=self.force, reads=self.reads)

    def __enter__(self) -> Path:
        self.check()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(self.out)
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()
        self._on_interrupt = cleanup_on_interrupt(lambda: shutil.rmtree(self.tmp, ignore_errors=True))
        self._on_interrupt.__enter__()
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        self._on_interrupt.__exit__(None, None, None)
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
