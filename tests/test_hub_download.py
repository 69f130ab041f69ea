"""Sources from the Hub through the real huggingface_hub client: a download from the loopback Hub,
the offline path (HF_HUB_OFFLINE=1 with a populated cache under HF_HOME), and the Hub errors."""

from __future__ import annotations

import json

import huggingface_hub
import pytest

from ckptforge.cli import main
from conftest import build_tiny, cli_env, run_cli
from hub_loopback import LoopbackHub


@pytest.fixture
def hub(tmp_path):
    server = LoopbackHub().start()
    dense = build_tiny("vit", tmp_path / "dense")
    server.add_model("org/tiny-vit", {p.name: p.read_bytes() for p in dense.iterdir()})
    yield server
    server.stop()


def test_download_from_the_hub_then_inspect_offline_from_the_cache(hub, tmp_path):
    home = str(tmp_path / "hf-home")
    online = run_cli("inspect", "org/tiny-vit", "--json", env=cli_env(HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", HF_HOME=home))
    assert online.returncode == 0, online.stderr
    assert json.loads(online.stdout)["family"] == "vit"
    assert hub.endpoints().count("resolve") >= 2  # config.json and model.safetensors were fetched
    hub.requests.clear()
    offline = run_cli("inspect", "org/tiny-vit", "--json", env=cli_env(HF_HUB_OFFLINE="1", HF_HOME=home))
    assert offline.returncode == 0, offline.stderr
    assert json.loads(offline.stdout)["num_layers"] == 4 and hub.requests == []


def test_offline_cache_miss_and_unknown_repo_exit_4(hub, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert main(["inspect", "org/tiny-vit"]) == 4
    assert capsys.readouterr().err.strip() == (
        "error: 'org/tiny-vit' is not in the local Hugging Face cache and the Hub cannot be reached "
        "(HF_HUB_OFFLINE or no network); download it once online, or pass a local path"
    )
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
    assert main(["inspect", "org/absent"]) == 4
    assert capsys.readouterr().err.strip() == (
        "error: Hub repo 'org/absent' not found or private; check the id, or set HF_TOKEN for a private repo"
    )
