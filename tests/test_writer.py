"""The streaming shard writer: O_DIRECT and page-cache paths write the same, loadable bytes."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ckptforge.io import writer
from ckptforge.io.writer import TensorSpec, use_direct_io, write_shard

needs_direct = pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this platform")


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {  # sizes that are not multiples of the 4096-byte alignment, and one that is
        "a": torch.randn(37, 29, generator=g).to(torch.bfloat16),
        "b": torch.randn(1024, generator=g),
        "c": torch.randint(-100, 100, (3, 5, 7), generator=g, dtype=torch.int64),
        "d": torch.randn(5, generator=g, dtype=torch.float64),
    }


def _write(path: Path, tensors: dict[str, torch.Tensor], direct: bool, pieces: int = 1) -> str:
    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    chunks = [iter(t.reshape(-1).tensor_split(pieces)) for t in tensors.values()]
    return write_shard(path, specs, chunks, direct=direct)


@needs_direct
@pytest.mark.parametrize("buffer_bytes", [4096, 8192, 1 << 20])
def test_direct_and_buffered_writes_are_byte_identical(tmp_path, monkeypatch, buffer_bytes):
    monkeypatch.setattr(writer._DirectSink, "BUFFER_BYTES", buffer_bytes)  # many buffers, ring reuse
    tensors = _tensors()
    digests = {}
    for direct in (False, True):
        path = tmp_path / f"{direct}.safetensors"
        digest = _write(path, tensors, direct, pieces=3)
        data = path.read_bytes()
        assert digest == hashlib.sha256(data).hexdigest()
        loaded = load_file(path)
        assert all(torch.equal(loaded[n], t) for n, t in tensors.items())
        digests[direct] = digest
    assert digests[True] == digests[False]
    assert (tmp_path / "True.safetensors").stat().st_size == (tmp_path / "False.safetensors").stat().st_size


@needs_direct
def test_file_system_that_refuses_o_direct_at_open_gets_a_buffered_file(tmp_path, monkeypatch):
    real_open = os.open

    def refusing_open(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refusing_open)
    tensors = _tensors(1)
    digest = _write(tmp_path / "m.safetensors", tensors, direct=True)
    assert digest == hashlib.sha256((tmp_path / "m.safetensors").read_bytes()).hexdigest()
    assert torch.equal(load_file(tmp_path / "m.safetensors")["c"], tensors["c"])


def _opens_with_o_direct(directory: Path) -> bool:
    try:
        fd = os.open(directory / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    except OSError:
        return False
    os.close(fd)
    os.unlink(directory / "probe")
    return True


@needs_direct
def test_file_system_that_refuses_o_direct_writes_falls_back_to_the_page_cache(tmp_path, monkeypatch):
    import fcntl

    if not _opens_with_o_direct(tmp_path):
        pytest.skip("the temporary directory's file system has no O_DIRECT")

    real_pwrite = os.pwrite
    refused = []

    def pwrite(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    tensors = _tensors(2)
    digest = _write(tmp_path / "m.safetensors", tensors, direct=True)
    assert refused == [0]  # refused once, then O_DIRECT is dropped from the descriptor
    assert digest == hashlib.sha256((tmp_path / "m.safetensors").read_bytes()).hexdigest()
    assert torch.equal(load_file(tmp_path / "m.safetensors")["a"], tensors["a"])


@needs_direct
def test_a_write_error_surfaces_instead_of_a_short_file(tmp_path, monkeypatch):
    def full_disk(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full_disk)
    with pytest.raises(OSError, match="No space left"):
        _write(tmp_path / "m.safetensors", _tensors(), direct=True)


@pytest.mark.parametrize("direct", [False, pytest.param(True, marks=needs_direct)])
def test_pieces_that_do_not_add_up_to_the_planned_tensor_are_refused(tmp_path, direct):
    specs = [TensorSpec("w", torch.float32, (4, 4))]
    with pytest.raises(RuntimeError, match="wrote 32 bytes, planned 64"):
        write_shard(tmp_path / "m.safetensors", specs, [iter([torch.zeros(8)])], direct=direct)


def test_direct_io_choice_follows_size_and_environment(monkeypatch):
    big, small = writer.DIRECT_IO_MIN_BYTES, writer.DIRECT_IO_MIN_BYTES - 1
    monkeypatch.delenv("CKPTFORGE_DIRECT_IO", raising=False)
    has = hasattr(os, "O_DIRECT")
    assert (use_direct_io(big), use_direct_io(small)) == (has, False)
    monkeypatch.setenv("CKPTFORGE_DIRECT_IO", "1")
    assert use_direct_io(1) == has
    monkeypatch.setenv("CKPTFORGE_DIRECT_IO", "0")
    assert not use_direct_io(big)
