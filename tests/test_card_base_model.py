"""Issue 12, defect "base_model in the card comes from any a/b string": the card names a
``base_model`` only for a source resolved from the Hub (a Hub id, an alias, or a path inside a
Hugging Face cache snapshot); ``--base-model ID`` on upcycle and push names it otherwise."""

from __future__ import annotations

import json
import shutil

import huggingface_hub
import pytest
import yaml

from ckptforge.cli import main
from conftest import REPO, build_tiny
from hub_loopback import LoopbackHub


def _card_meta(out) -> dict:
    return yaml.safe_load((out / "README.md").read_text().split("---")[1])


def test_a_local_path_that_looks_like_org_name_is_not_a_base_model(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)  # the README example: a relative path with one slash
    out = tmp_path / "moe"
    assert main(["upcycle", "examples/tiny-vit-mnist", "--experts", "4", "--out", str(out), "--quiet"]) == 0
    assert "base_model" not in _card_meta(out)


def test_a_path_inside_a_hub_cache_snapshot_names_its_repo(tmp_path, capsys):
    snapshot = tmp_path / "hub" / "models--someone--tiny-vit" / "snapshots" / "0123abcd"
    build_tiny("vit", snapshot)
    out = tmp_path / "moe"
    assert main(["upcycle", str(snapshot), "--experts", "4", "--out", str(out), "--quiet"]) == 0
    assert _card_meta(out)["base_model"] == "someone/tiny-vit"


def test_upcycle_base_model_names_it_and_a_bad_id_is_refused(tmp_path, capsys):
    dense = build_tiny("vit", tmp_path / "dense")
    out = tmp_path / "moe"
    assert main(["upcycle", str(dense), "--experts", "4", "--out", str(out), "--quiet", "--base-model", "me/dense-vit"]) == 0
    assert _card_meta(out)["base_model"] == "me/dense-vit"
    capsys.readouterr()
    bad = tmp_path / "bad"
    assert main(["upcycle", str(dense), "--experts", "4", "--out", str(bad), "--base-model", "not an id"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --base-model 'not an id' is not a Hub repo id; write it as "
                                               "namespace/name, e.g. google/vit-base-patch16-224")
    assert not bad.exists()


def test_push_base_model_names_it_in_the_pushed_card(tmp_path, monkeypatch, capsys):
    dense = build_tiny("vit", tmp_path / "dense")
    out = tmp_path / "moe"
    assert main(["upcycle", str(dense), "--experts", "4", "--out", str(out), "--quiet"]) == 0
    server = LoopbackHub().start()
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", server.url)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setenv("HF_TOKEN", "hf_loopbackSECRETtoken0123456789")
    try:
        assert main(["push", str(out), "me/vit-moe", "--base-model", "me/dense-vit", "--json"]) == 0, capsys.readouterr().err
    finally:
        server.stop()
    pushed = server.repos["me/vit-moe"].branches["main"]["README.md"].decode()
    assert yaml.safe_load(pushed.split("---")[1])["base_model"] == "me/dense-vit"
    assert main(["push", str(out), "me/vit-moe", "--base-model", "x", "--json"]) == 2  # checked, nothing sent
