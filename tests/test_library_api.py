"""Issue 12, defect "the library API skips CLI-only rules": ``ckptforge.upcycle()`` from Python
applies what ``ckptforge upcycle`` applies (the soft/sphero default strategy, "--noise-std /
--drop-ratio apply to copy-all only", the recipe's family), and the command resolves its source once."""

from __future__ import annotations

import json

import pytest

import ckptforge
import ckptforge.io.source as source_module
from ckptforge.cli import main
from ckptforge.errors import UsageError
from ckptforge.recipes import load_recipe, resolve_options
from conftest import REPO, build_tiny

SAMPLES = str(REPO / "examples" / "mnist-samples")


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    return build_tiny("vit", tmp_path_factory.mktemp("dense") / "vit")


def test_python_and_command_write_the_same_sphero_conversion(vit, tmp_path, capsys):
    by_cli, by_api = tmp_path / "cli", tmp_path / "api"
    assert main(["upcycle", str(vit), "--router", "sphero", "--experts", "4", "--calibration", SAMPLES,
                 "--calib-samples", "16", "--out", str(by_cli), "--quiet"]) == 0, capsys.readouterr().err
    ckptforge.upcycle(vit, by_api, ckptforge.UpcycleOptions(num_experts=4, router={"type": "sphero"},
                                                             calibration=SAMPLES, calib_samples=16))
    api_meta = json.loads((by_api / "ckptforge.json").read_text())
    cli_meta = json.loads((by_cli / "ckptforge.json").read_text())
    assert api_meta["options"]["strategy"] == cli_meta["options"]["strategy"] == "importance"
    weights = {k: v for k, v in cli_meta["files"].items() if k.endswith(".safetensors")}
    assert weights and {k: api_meta["files"][k] for k in weights} == weights


def test_python_refuses_noise_for_a_subset_strategy_as_the_command_does(vit, tmp_path, capsys):
    options = ckptforge.UpcycleOptions(num_experts=4, strategy="random", strategy_params={"noise_std": 0.1})
    with pytest.raises(UsageError, match=r"--noise-std does not apply to --strategy random; it is a setting of "
                                         r"--strategy copy-all: drop it or use that strategy"):
        ckptforge.upcycle(vit, tmp_path / "api", options)
    assert not (tmp_path / "api").exists()
    assert main(["upcycle", str(vit), "--strategy", "random", "--noise-std", "0.1", "--out", str(tmp_path / "c")]) == 2


def test_python_refuses_a_recipe_for_another_family(vit, tmp_path):
    options = resolve_options(load_recipe("mixtral-llama"), {})
    with pytest.raises(UsageError, match=r"recipe 'mixtral-llama' is for llama checkpoints, but the source is a vit"):
        ckptforge.upcycle(vit, tmp_path / "api", options)
    assert not (tmp_path / "api").exists()


def test_the_command_resolves_the_source_once(vit, tmp_path, monkeypatch, capsys):
    calls = []
    real = source_module.resolve_source
    monkeypatch.setattr(source_module, "resolve_source", lambda ref: calls.append(ref) or real(ref))
    assert main(["upcycle", str(vit), "--experts", "4", "--out", str(tmp_path / "o"), "--quiet"]) == 0
    assert calls == [str(vit)]
