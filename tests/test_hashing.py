"""Source hashes started early (while the CLI imports torch) are used only for unchanged files (issue 15)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest

from ckptforge.cli import main
from ckptforge.io import hashing
from ckptforge.io.hashing import file_sha256, local_source_files, prehash


@pytest.fixture(autouse=True)
def _no_early_hashes():
    """Earlier tests ran CLI conversions in this process; start and end without their early hashes."""
    _wait_started()
    hashing._started.clear()
    yield
    _wait_started()
    hashing._started.clear()


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _wait_started(timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while any(not f.done() for f in hashing._started.values()) and time.monotonic() < deadline:
        time.sleep(0.01)


def test_an_early_hash_is_taken_for_an_unchanged_file(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc" * 100_000)
    prehash([f])
    _wait_started()
    assert len(hashing._started) == 1
    assert file_sha256(f) == _digest(f)
    assert hashing._started == {}  # taken, not hashed again


def test_a_file_changed_after_the_early_hash_is_hashed_again(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"old" * 1000)
    prehash([f])
    _wait_started()
    f.write_bytes(b"new content, another size")
    assert file_sha256(f) == _digest(f)
    prehash([])  # forgets the stale entry (keyed by the old identity, never taken)
    assert hashing._started == {}


def test_local_source_files_guesses_only_files_inside_the_directory(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors", "c": "../evil.safetensors"}}))
    assert local_source_files(str(tmp_path)) == [
        tmp_path / "config.json", tmp_path / "model-00001-of-00002.safetensors", tmp_path / "model-00002-of-00002.safetensors"]
    assert local_source_files("org/name") == []
    (tmp_path / "model.safetensors.index.json").write_text("not json")
    assert local_source_files(str(tmp_path)) == []


def test_cli_conversion_records_the_true_source_hashes(tiny, tmp_path, capsys):
    dense = tiny("llama")
    out = tmp_path / "moe"
    assert main(["upcycle", str(dense), "--experts", "4", "--out", str(out), "--json"]) == 0
    recorded = json.loads((out / "ckptforge.json").read_text())["source"]["files"]
    assert recorded == {n: _digest(dense / n) for n in ("config.json", "model.safetensors")}
    assert hashing._started == {}
