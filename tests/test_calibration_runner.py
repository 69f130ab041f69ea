"""Single-source calibration through the layer-by-layer runner (DESIGN §2, issue 14): the same
statistics, so the same output bytes, as the whole-model forward; used when the model would not fit."""

from __future__ import annotations

import pytest
import torch

from ckptforge import UpcycleOptions, upcycle
from ckptforge.calibration import collect_stats
from ckptforge.calibration_data import load_calibration
from ckptforge.calibration_runner import RUNNER_ENV, available_memory, choose_runner, model_fits
from ckptforge.cli import main
from ckptforge.io.source import open_checkpoint
from ckptforge.multisource.runner import collect_stats_layerwise

from calib_helpers import add_tokenizer, image_folder, text_file
from conftest import build_tiny, read_json

CASES = [("importance", {}, "normal"), ("coactivation", {"mode": "partition"}, "centroid")]


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
@pytest.mark.parametrize("strategy,params,router_init", CASES, ids=[c[0] for c in CASES])
def test_the_layer_runner_writes_the_same_weights_as_the_whole_model(tmp_path, monkeypatch, kind, strategy, params,
                                                                     router_init):
    src = add_tokenizer(build_tiny(kind, tmp_path / "m", num_hidden_layers=3))
    data = text_file(tmp_path / "c.txt", lines=20)
    written = {}
    for runner in ("model", "layers"):
        monkeypatch.setenv(RUNNER_ENV, runner)
        out = tmp_path / runner
        upcycle(src, out, UpcycleOptions(num_experts=4, layers="all", strategy=strategy, strategy_params=params,
                                         router_init=router_init, calibration=str(data), calib_batch_size=4))
        written[runner] = (out / "model.safetensors").read_bytes()
        stats = read_json(out / "ckptforge.json")["calibration"]["statistics"]
        assert stats.get("runner") == (None if runner == "model" else "layer-by-layer")
    assert written["model"] == written["layers"]


def test_layer_runner_collects_ffn_input_channels_too(tmp_path):
    """Cross-size recycling (issue 13) reads the FFN inputs' per-channel energy."""
    src = add_tokenizer(build_tiny("llama", tmp_path / "m", num_hidden_layers=3))
    ckpt = open_checkpoint(src)
    data = load_calibration(text_file(tmp_path / "c.txt", lines=10), ckpt, "text", batch_size=4)
    whole = collect_stats(ckpt, data, [1, 2], needs={"channels"}, device="cpu")
    layered = collect_stats_layerwise(ckpt, data, [1, 2], needs={"channels"})
    for i in (1, 2):
        assert whole.layer(i).input_sq.abs().sum() > 0
        assert torch.allclose(whole.layer(i).input_sq, layered.layer(i).input_sq, rtol=1e-5)


def test_the_runner_is_the_whole_model_while_it_fits_and_layers_beyond(tmp_path, monkeypatch):
    ckpt = open_checkpoint(build_tiny("llama", tmp_path / "m"))
    size = 4 * sum(t.numel for t in ckpt.tensors.values())
    assert model_fits(ckpt, available=2 * size) and not model_fits(ckpt, available=2 * size - 1)
    assert 0 < available_memory()
    monkeypatch.delenv(RUNNER_ENV, raising=False)
    assert choose_runner(fits=True, supported=True) == "model"
    assert choose_runner(fits=False, supported=True) == "layers"
    assert choose_runner(fits=False, supported=False) == "model"  # ViT / BERT: only the whole model
    monkeypatch.setenv(RUNNER_ENV, "layers")
    assert choose_runner(fits=True, supported=True) == "layers"
    monkeypatch.setenv(RUNNER_ENV, "model")
    assert choose_runner(fits=False, supported=True) == "model"


@pytest.mark.parametrize("setting,message", [
    ("layers", f"error: {RUNNER_ENV}=layers: vit checkpoints cannot be run layer by layer (decoder-only LLMs can); "
               "unset it"),
    ("sideways", f"error: {RUNNER_ENV}='sideways' is not one of auto, model, layers; unset it or pick one"),
])
def test_a_runner_setting_that_cannot_apply_is_refused(tmp_path, monkeypatch, capsys, setting, message):
    src, data = build_tiny("vit", tmp_path / "vit"), image_folder(tmp_path / "imgs")
    capsys.readouterr()
    monkeypatch.setenv(RUNNER_ENV, setting)
    out = tmp_path / "moe"
    code = main(["upcycle", str(src), "--strategy", "importance", "--calibration", str(data),
                 "--out", str(out), "--quiet"])
    assert code == 2 and not out.exists()
    assert capsys.readouterr().err.strip() == message
