"""Cross-size recycling (``upcycle STUDENT --teacher BIG``): experts are the teacher's FFN on the
chosen hidden units and channels, everything else is the student's; bad teachers exit 2 and write
nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ckptforge
from ckptforge.calibration import collect_stats
from ckptforge.calibration_data import load_calibration
from ckptforge.cross_size import choose_channels, top_channels
from ckptforge.errors import PlanError
from ckptforge.io.source import open_checkpoint
from ckptforge.loading import load_model
from ckptforge.recipes import _option_problems

from calib_helpers import image_folder
from conftest import build_tiny, read_json, run_cli


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("cross")
    student = build_tiny("vit", root / "student", seed=1)
    teacher = build_tiny("vit", root / "teacher", seed=2, hidden_size=64, intermediate_size=128)
    return student, teacher, image_folder(root / "imgs", count=12)


def test_experts_are_the_teachers_ffn_on_the_chosen_units_and_channels(pair, tmp_path):
    student, teacher, imgs = pair
    options = ckptforge.UpcycleOptions(num_experts=4, top_k=2, layers="1,3", strategy="importance",
                                       strategy_params={"expert_width": 48}, calibration=str(imgs), teacher=str(teacher))
    result = ckptforge.upcycle(student, tmp_path / "moe", options)
    out = load_file(tmp_path / "moe" / "model.safetensors")
    t = load_file(teacher / "model.safetensors")
    s = load_file(student / "model.safetensors")
    prov = read_json(tmp_path / "moe" / "ckptforge.json")
    channels = torch.tensor(prov["teacher"]["channels"])
    assert channels.numel() == 32 and bool((channels.diff() > 0).all()) and int(channels.max()) < 64
    for layer, units in result.expert_units.items():
        up = t[f"vit.encoder.layer.{layer}.intermediate.dense.weight"]
        down = t[f"vit.encoder.layer.{layer}.output.dense.weight"]
        moe = f"vit.encoder.layer.{layer}.moe.experts."
        for e, u in enumerate(units):
            assert u.numel() == 48 and int(u.max()) < 128
            assert torch.equal(out[moe + "w1"][e], up[u][:, channels])
            assert torch.equal(out[moe + "w2"][e], down[channels][:, u])
            assert torch.equal(out[moe + "b2"][e], t[f"vit.encoder.layer.{layer}.output.dense.bias"][channels])
    for name in ("vit.encoder.layer.1.attention.attention.query.weight", "vit.embeddings.cls_token", "classifier.weight"):
        assert torch.equal(out[name], s[name])
    # the channels are the teacher's highest-energy FFN-input channels over the MoE layers
    ckpt = open_checkpoint(str(teacher))
    data = load_calibration(str(imgs), ckpt, "image", samples=256, batch_size=16, seed=0)
    stats = collect_stats(ckpt, data, [1, 3], needs={"channels"}, device="cpu")
    assert torch.equal(channels, choose_channels(stats, [1, 3], 32))
    energy = stats.layer(1).input_sq + stats.layer(3).input_sq
    assert energy[channels].min() >= energy[torch.tensor([c for c in range(64) if c not in set(channels.tolist())])].max()
    card = (tmp_path / "moe" / "README.md").read_text()
    assert f"experts recycled from | `{teacher}` (d 64, d_ff 128)" in card and "32 of 64 channels" in card
    model = load_model(tmp_path / "moe")  # loads, and runs
    assert model(pixel_values=torch.randn(2, 1, 28, 28)).logits.shape == (2, 10)


def test_top_channels_ties_and_order():
    assert top_channels(torch.tensor([1.0, 5.0, 5.0, 0.0]), 2).tolist() == [1, 2]


def test_bad_teachers_exit_2_and_write_nothing(pair, tmp_path):
    student, teacher, imgs = pair
    bert = build_tiny("bert", tmp_path / "bert")
    out = tmp_path / "moe"
    done = run_cli("upcycle", str(teacher), "--teacher", str(student), "--calibration", str(imgs),
                   "--experts", "4", "--out", str(out))
    assert done.returncode == 2 and "has hidden size 32, smaller than the student's 64" in done.stderr
    assert not out.exists()
    done = run_cli("upcycle", str(student), "--teacher", str(bert), "--calibration", str(imgs), "--out", str(out))
    assert done.returncode == 2 and not out.exists()
    assert "is a bert model and the student a vit model; use a wider vit checkpoint" in done.stderr
    done = run_cli("upcycle", str(student), "--teacher", str(teacher), "--strategy", "copy-all",
                   "--calibration", str(imgs), "--out", str(out))
    assert done.returncode == 2 and "--strategy copy-all cannot; use one of importance, random, uniform" in done.stderr
    done = run_cli("upcycle", str(student), "--teacher", str(teacher), "--out", str(out))
    assert done.returncode == 2 and "--teacher (its FFN-input channels are chosen by importance)" in done.stderr
    with pytest.raises(PlanError, match="has 4 layers; student MoE layer 5"):
        deep = build_tiny("vit", tmp_path / "deep", num_hidden_layers=6)
        ckptforge.upcycle(deep, out, ckptforge.UpcycleOptions(num_experts=4, layers="5", strategy="importance",
                                                              calibration=str(imgs), teacher=str(teacher)))
    assert not out.exists()


def test_cli_default_strategy_and_recipe_field(pair, tmp_path):
    student, teacher, imgs = pair
    done = run_cli("upcycle", str(student), "--teacher", str(teacher), "--calibration", str(imgs),
                   "--experts", "4", "--dry-run", "--json")
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)["plan"]
    assert plan["strategy"] == "importance" and plan["teacher"]["hidden_size"] == 64
    assert _option_problems({"teacher": str(teacher), "strategy": "importance"}) == []


def _recipe(path: Path, **options) -> Path:
    body = {"name": "jetpack-test", "method": "MoE Jetpack", "paper": "arXiv:2406.04801", "summary": "cross-size",
            "family": "vit", "options": {"num_experts": 4, "top_k": 2, **options}}
    path.write_text(json.dumps(body))  # JSON is YAML
    return path


def test_recipe_field_teacher_and_typed_teacher_beats_it(pair, tmp_path):
    student, teacher, imgs = pair
    other = build_tiny("vit", tmp_path / "other", seed=3, hidden_size=48, intermediate_size=96)
    recipe = _recipe(tmp_path / "r.yaml", teacher=str(teacher))
    done = run_cli("upcycle", str(student), "--recipe", str(recipe), "--calibration", str(imgs), "--dry-run", "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["plan"]["teacher"]["source"] == str(teacher) and out["plan"]["teacher"]["hidden_size"] == 64
    assert out["plan"]["strategy"] == "importance"  # the recipe's teacher brings the cross-size default
    done = run_cli("upcycle", str(student), "--recipe", str(recipe), "--teacher", str(other), "--calibration", str(imgs),
                   "--dry-run", "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["plan"]["teacher"]["source"] == str(other) and out["plan"]["teacher"]["hidden_size"] == 48
    assert out["recipe"]["overrides"]["teacher"] == str(other)
    bad = _recipe(tmp_path / "bad.yaml", teacher=5)
    done = run_cli("upcycle", str(student), "--recipe", str(bad), "--calibration", str(imgs), "--out", str(tmp_path / "o"))
    assert done.returncode == 2 and "options.teacher: must be a string, not int" in done.stderr
    assert not (tmp_path / "o").exists()
