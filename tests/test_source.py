"""Sources: files, directories, pickles (safely), Hub ids through an offline cache, bad inputs."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from ckptforge.errors import HubError, SourceError, UnsafeCheckpointError
from ckptforge.io.source import ALIASES, open_checkpoint, resolve_source


class _Payload:
    """Unpickling this runs code: it would create the file named by ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_lone_safetensors_file_is_indexed_lazily(tiny):
    dense = tiny("vit")
    ckpt = open_checkpoint(dense / "model.safetensors")
    assert ckpt.config["model_type"] == "vit"
    info = ckpt.tensors["classifier.weight"]
    assert info.shape == (10, 32) and info.dtype == torch.float32
    assert ckpt.read("classifier.weight").shape == (10, 32)


def test_pickle_with_code_payload_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with open(tmp_path / "pytorch_model.bin", "wb") as f:
        pickle.dump({"w": _Payload(marker)}, f)
    with pytest.raises(UnsafeCheckpointError, match="carries code"):
        open_checkpoint(tmp_path / "pytorch_model.bin")
    torch.save({"w": _Payload(marker)}, tmp_path / "zipped.pt")
    with pytest.raises(UnsafeCheckpointError):
        open_checkpoint(tmp_path / "zipped.pt")
    assert not marker.exists()


@pytest.mark.parametrize("content,match", [
    (b"\x00" * 3, "not a valid safetensors file"),
    (os.urandom(4096), "not a valid safetensors file"),
])
def test_garbage_safetensors_is_unreadable(tmp_path, content, match):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    (tmp_path / "model.safetensors").write_bytes(content)
    with pytest.raises(SourceError, match=match):
        open_checkpoint(tmp_path)


def test_truncated_safetensors_is_unreadable(tiny, tmp_path):
    dense = tiny("vit")
    data = (dense / "model.safetensors").read_bytes()
    (dense / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(SourceError, match="truncated"):
        open_checkpoint(dense)


def test_missing_path_and_empty_directory(tmp_path):
    with pytest.raises(SourceError, match="not found"):
        open_checkpoint(tmp_path / "nope")
    with pytest.raises(SourceError, match="holds no checkpoint"):
        open_checkpoint(tmp_path)


def test_file_without_config_beside_it(tiny, tmp_path):
    dense = tiny("vit")
    shutil.copy(dense / "model.safetensors", tmp_path / "w.safetensors")
    with pytest.raises(SourceError, match="no config.json"):
        open_checkpoint(tmp_path / "w.safetensors")


def _populate_cache(hf_home: Path, repo_id: str, source: Path, commit: str = "a" * 40) -> None:
    """Lay out a Hugging Face cache entry exactly as huggingface_hub does (refs + snapshot)."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in source.iterdir():
        shutil.copy(f, snapshot / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_hub_id_resolves_from_offline_cache(tiny, tmp_path, monkeypatch):
    dense = tiny("bert")
    hf_home = tmp_path / "hf"
    _populate_cache(hf_home, "tiny-org/tiny-bert", dense)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hf_home / "hub"))
    ckpt = open_checkpoint("tiny-org/tiny-bert")
    assert ckpt.config["model_type"] == "bert" and ckpt.revision is None
    path, revision = resolve_source("tiny-org/tiny-bert@" + "a" * 40)
    assert revision == "a" * 40 and (path / "config.json").is_file()
    with pytest.raises(HubError, match="not in the local Hugging Face cache"):
        open_checkpoint("tiny-org/absent")


def test_aliases_point_at_hub_ids():
    assert ALIASES["vit-base"] == "google/vit-base-patch16-224"
    assert ALIASES["bert-base"] == "google-bert/bert-base-uncased"
    assert all("/" in v for v in ALIASES.values())
