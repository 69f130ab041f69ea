"""Issue 15: shards are written in parallel (each with its own sha256 chain); the bytes, hashes
and index equal those of shards written one at a time, and a failing shard stops the others."""

from __future__ import annotations

import hashlib
import threading

import pytest

import ckptforge.execute as execute
from ckptforge import UpcycleOptions, upcycle
from ckptforge.io import writer


def _files(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != "ckptforge.json"}


@pytest.mark.parametrize("options", [
    dict(num_experts=4, layers="all", shard_size=40_000),
    dict(num_experts=4, layers="all", shard_size=40_000, strategy_params={"drop_ratio": 0.5}),
    dict(num_experts=4, layers="all", shard_size=40_000, strategy="importance"),
], ids=["copy-all", "drop-upcycling", "importance"])
def test_parallel_shards_are_byte_identical_to_serial_ones(tiny, tmp_path, monkeypatch, options):
    dense = tiny("llama")
    threads: set[str] = set()
    real = writer.write_shard

    def spy(*args, **kwargs):
        threads.add(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(execute, "write_shard", spy)
    parallel = upcycle(dense, tmp_path / "parallel", UpcycleOptions(**options))
    assert len(threads) == min(len(parallel.plan.shards), execute.PARALLEL_SHARDS) > 1  # shards at once, really
    monkeypatch.setattr(execute, "PARALLEL_SHARDS", 1)
    serial = upcycle(dense, tmp_path / "serial", UpcycleOptions(**options))
    assert _files(tmp_path / "parallel") == _files(tmp_path / "serial")
    assert parallel.files == serial.files
    for name, digest in parallel.files.items():
        assert hashlib.sha256((tmp_path / "parallel" / name).read_bytes()).hexdigest() == digest


def test_a_failing_shard_stops_the_others_and_writes_nothing(tiny, tmp_path, monkeypatch):
    dense = tiny("llama")
    written: list[str] = []
    real = writer.write_shard

    def failing(path, specs, chunks, direct=None):
        if path.name.startswith("model-00002"):
            raise OSError(28, "No space left on device")
        written.append(path.name)
        return real(path, specs, chunks, direct)

    monkeypatch.setattr(execute, "write_shard", failing)
    with pytest.raises(OSError, match="No space left"):
        upcycle(dense, tmp_path / "moe", UpcycleOptions(num_experts=4, layers="all", shard_size=40_000))
    assert [p.name for p in tmp_path.iterdir() if "moe" in p.name] == []
    assert len(written) < 8  # the shards after the failure were not all written


def test_stop_event_ends_a_shard_at_its_next_piece():
    stop = threading.Event()
    pieces = execute._counted(iter([b"a", b"b"]), None, stop)
    assert next(pieces) == b"a"
    stop.set()
    with pytest.raises(execute._Stopped):
        next(pieces)


@pytest.mark.slow
def test_ctrl_c_while_shards_are_written_in_parallel_is_one_line_and_leaves_nothing(tmp_path):
    """SIGINT once two shard files exist: exit 130, one line, no output and no temporary directory."""
    import signal

    from test_cli import _interruptible_conversion

    proc, out = _interruptible_conversion(tmp_path)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.strip().splitlines() == ["error: interrupted"], err
    assert not out.exists() and not list(tmp_path.glob(".moe.ckptforge-*"))
