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
    done = run_cli("upcycle", str(student), "--teacher", str(teacher), "--calibration", str(imgs), "--verify",
                   "--out", str(out))
    assert done.returncode == 2 and "with --teacher the experts come from another model; drop --verify" in done.stderr
    assert not out.exists()
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


# --- a student given as a config only: every weight sliced from the teacher -------------------------------------

def _config_only(directory: Path, kind: str, **overrides) -> Path:
    """A directory holding only the config.json of the tiny ``kind`` model (no weights)."""
    from conftest import TINY

    config_cls, _, kwargs = TINY[kind]
    config_cls(**{**kwargs, **overrides}).save_pretrained(directory)
    assert [p.name for p in directory.iterdir()] == ["config.json"]
    return directory


def _rows_of(student_rows: torch.Tensor, teacher_rows: torch.Tensor) -> list[int]:
    """For each student row, the index of the teacher row (already narrowed) that equals it."""
    return [int(torch.nonzero((teacher_rows == row).all(dim=1)).flatten()[0]) for row in student_rows]


def test_config_only_vit_student_is_sliced_from_the_teacher(pair, tmp_path):
    _, teacher, imgs = pair  # teacher: d 64, d_ff 128, 2 heads of 32
    student = _config_only(tmp_path / "student", "vit")  # d 32, d_ff 64, 2 heads of 16
    options = ckptforge.UpcycleOptions(num_experts=4, top_k=2, layers="1,3", calibration=str(imgs), teacher=str(teacher))
    ckptforge.upcycle(student, tmp_path / "moe", options)
    out = load_file(tmp_path / "moe" / "model.safetensors")
    t = load_file(teacher / "model.safetensors")
    ch = torch.tensor(read_json(tmp_path / "moe" / "ckptforge.json")["teacher"]["channels"])
    assert ch.numel() == 32
    # embeddings, norms and head: the teacher's on the experts' channels
    assert torch.equal(out["vit.embeddings.cls_token"], t["vit.embeddings.cls_token"][..., ch])
    assert torch.equal(out["vit.embeddings.position_embeddings"], t["vit.embeddings.position_embeddings"][..., ch])
    assert torch.equal(out["vit.embeddings.patch_embeddings.projection.weight"],
                       t["vit.embeddings.patch_embeddings.projection.weight"][ch])
    assert torch.equal(out["vit.layernorm.weight"], t["vit.layernorm.weight"][ch])
    assert torch.equal(out["classifier.weight"], t["classifier.weight"][:, ch])
    assert torch.equal(out["classifier.bias"], t["classifier.bias"])
    # attention: per head 16 of its 32 dims, the same dims for q, k, v and o
    p = "vit.encoder.layer.{}.attention."
    for layer in range(4):
        a = p.format(layer)
        rows = _rows_of(out[a + "attention.query.weight"], t[a + "attention.query.weight"][:, ch])
        assert [r // 32 for r in rows] == [0] * 16 + [1] * 16 and rows == sorted(rows)
        for name in ("key", "value"):
            assert torch.equal(out[a + f"attention.{name}.weight"], t[a + f"attention.{name}.weight"][rows][:, ch])
            assert torch.equal(out[a + f"attention.{name}.bias"], t[a + f"attention.{name}.bias"][rows])
        assert torch.equal(out[a + "output.dense.weight"], t[a + "output.dense.weight"][ch][:, rows])
    # a dense layer's FFN: the teacher's top-64 units by weight norm, on the channels
    up, down = t["vit.encoder.layer.0.intermediate.dense.weight"], t["vit.encoder.layer.0.output.dense.weight"]
    units = torch.topk(up.double().norm(dim=1) * down.double().norm(dim=0), 64).indices.sort().values
    assert torch.equal(out["vit.encoder.layer.0.intermediate.dense.weight"], up[units][:, ch])
    assert torch.equal(out["vit.encoder.layer.0.output.dense.weight"], down[ch][:, units])
    card = (tmp_path / "moe" / "README.md").read_text()
    assert "every other weight sliced from the teacher too, on the same channels" in card
    assert "attention heads 2 of 2, head dim 16 of 32" in card
    model = load_model(tmp_path / "moe")
    assert model(pixel_values=torch.randn(2, 1, 28, 28)).logits.shape == (2, 10)
    # the same student as a .json config file
    done = run_cli("upcycle", str(student / "config.json"), "--teacher", str(teacher), "--calibration", str(imgs),
                   "--experts", "4", "--dry-run", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["plan"]["teacher"]["student"]["heads"] == "2 of 2"


def test_config_only_student_shape_problems_exit_2_and_write_nothing(pair, tmp_path):
    _, teacher, imgs = pair
    out = tmp_path / "moe"
    cases = {
        "more_heads": (dict(num_attention_heads=4, hidden_size=32),
                       "the student has 4 attention heads (4 key/value), more than the teacher's 2 (2)"),
        "labels": (dict(num_labels=5), "classifier.weight is 10×64 in the teacher and 5×32 in the student"),
        "deeper": (dict(num_hidden_layers=6), "the student config has 6 layers and the teacher 4; student layer i"),
    }
    for name, (overrides, message) in cases.items():
        student = _config_only(tmp_path / name, "vit", **overrides)
        done = run_cli("upcycle", str(student), "--teacher", str(teacher), "--calibration", str(imgs),
                       "--experts", "4", "--out", str(out))
        assert done.returncode == 2 and message in done.stderr, (name, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1 and not out.exists()
    bert = _config_only(tmp_path / "bert", "bert")
    done = run_cli("upcycle", str(bert), "--teacher", str(teacher), "--calibration", str(imgs), "--out", str(out))
    assert done.returncode == 2 and "the student config is a 'bert' model" in done.stderr and not out.exists()
    done = run_cli("upcycle", str(tmp_path / "labels"), "--out", str(out))
    assert done.returncode == 3 and "is a config without weights; add --teacher BIG" in done.stderr


def test_config_only_llama_student_keeps_query_groups(tmp_path):
    from calib_helpers import add_tokenizer, text_file

    # teacher: d 64, 4 query heads in 2 key/value groups of 16 dims; student: d 32, 2 heads in 1 group
    teacher = add_tokenizer(build_tiny("llama", tmp_path / "teacher", hidden_size=64, intermediate_size=128,
                                       head_dim=16))
    student = _config_only(tmp_path / "student", "llama", num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    options = ckptforge.UpcycleOptions(num_experts=4, top_k=2, layers="all", teacher=str(teacher),
                                       calibration=str(text_file(tmp_path / "c.txt")))
    ckptforge.upcycle(student, tmp_path / "moe", options)
    out = load_file(tmp_path / "moe" / "model.safetensors")
    t = load_file(teacher / "model.safetensors")
    ch = torch.tensor(read_json(tmp_path / "moe" / "ckptforge.json")["teacher"]["channels"])
    for layer in range(2):
        a = f"model.layers.{layer}.self_attn."
        kv = _rows_of(out[a + "k_proj.weight"], t[a + "k_proj.weight"][:, ch])
        q = _rows_of(out[a + "q_proj.weight"], t[a + "q_proj.weight"][:, ch])
        group = kv[0] // 16
        assert kv == list(range(group * 16, group * 16 + 16))  # one whole key/value head
        assert all(r // 32 == group for r in q) and len({r // 16 for r in q}) == 2  # two query heads of that group
        assert torch.equal(out[a + "v_proj.weight"], t[a + "v_proj.weight"][kv][:, ch])
        assert torch.equal(out[a + "o_proj.weight"], t[a + "o_proj.weight"][ch][:, q])
    assert torch.equal(out["model.embed_tokens.weight"], t["model.embed_tokens.weight"][:, ch])
    model = load_model(tmp_path / "moe")
    assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 128)
    rotary = _config_only(tmp_path / "rotary", "llama", num_attention_heads=4, head_dim=8)
    with pytest.raises(PlanError, match="rotary positions tie the head dim"):
        ckptforge.upcycle(rotary, tmp_path / "bad", options)
    assert not (tmp_path / "bad").exists()
