"""finetune on tiny models: losses go down on learnable toy tasks, reports are complete, runs are
seeded, --compare really trains the dense model, and bad inputs fail with the fix in the message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from calib_helpers import add_tokenizer
from PIL import Image

import ckptforge
from ckptforge.datasets import load_task_data
from ckptforge.errors import UsageError
from ckptforge.finetune import FinetuneOptions, finetune, make_accelerator
from ckptforge.loading import load_model
from ckptforge.training import TrainSettings, train_run


@pytest.fixture(autouse=True)
def one_thread():
    """Two shared CPU cores: more torch threads than that only adds contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_image_folder(root: Path, classes: int = 2, per_class: int = 12, size: int = 28, seed: int = 1) -> Path:
    """Class c: a bright square in quadrant c on a noisy dark background (learnable in a few steps)."""
    g = torch.Generator().manual_seed(seed)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            x = torch.rand(size, size, generator=g) * 60
            r, q = (c // 2) * size // 2, (c % 2) * size // 2
            x[r: r + size // 2, q: q + size // 2] += 180
            Image.fromarray(x.clamp(0, 255).byte().numpy(), mode="L").save(root / f"class{c}" / f"{i}.png")
    return root


def make_moe(tiny, tmp_path: Path, kind: str, layers: str = "all") -> Path:
    dense = tiny(kind) if kind == "vit" else add_tokenizer(tiny(kind))  # text needs the model's tokenizer
    out = tmp_path / f"moe-{kind}"
    ckptforge.upcycle(dense, out, ckptforge.UpcycleOptions(num_experts=4, top_k=2, layers=layers, seed=0))
    return out


def run(moe: Path, data: Path, **kw) -> ckptforge.finetune.FinetuneReport:
    opts = dict(data=str(data), steps=24, lr=3e-3, batch_size=8, eval_every=8, device="cpu")
    return finetune(moe, FinetuneOptions(**{**opts, **kw}))


def test_vit_moe_learns_and_writes_the_report(tiny, tmp_path):
    moe = make_moe(tiny, tmp_path, "vit", layers="every-2")
    data = make_image_folder(tmp_path / "imgs", per_class=16)
    evals = make_image_folder(tmp_path / "eval", per_class=8, seed=2)
    report = run(moe, data, eval_data=str(evals), compare=str(tmp_path / "dense-vit"), scratch=True,
                 save=str(tmp_path / "saved"))
    runs = {r.name: r for r in report.runs}
    assert set(runs) == {"moe", "dense", "scratch"}
    for r in runs.values():  # 10-label tiny ViT, 2-class data: a new head, then learning
        assert r.head_replaced and r.eval[-1]["loss"] < r.eval[0]["loss"]
    assert all("aux_loss" in s for s in runs["moe"].train)  # the router's loss is in the MoE run
    assert not any("aux_loss" in s for s in runs["dense"].train)

    written = json.loads((moe / "finetune" / "finetune.json").read_text())
    report_keys = {"options", "settings", "data", "device", "runs", "recovery", "wall_seconds"}
    assert report_keys <= set(written)
    assert written["data"]["classes"] == ["class0", "class1"]
    assert written["device"]["device"] == "cpu" and written["device"]["num_processes"] == 1
    for r in written["runs"]:
        assert [e["step"] for e in r["eval"]] == [0, 8, 16, 24]
        assert [s["step"] for s in r["train"]] == list(range(1, 25))
        assert r["unit"] == "images" and r["throughput"] > 0 and r["examples"] == 24 * 8
    assert set(written["recovery"]["runs"]) == {"moe", "dense", "scratch"}
    assert written["recovery"]["metric"] == "eval accuracy"

    with Image.open(moe / "finetune" / "curves.png") as img:
        img.verify()
        assert img.format == "PNG" and img.size[0] > 500
    card = (moe / "README.md").read_text()
    assert card.count("## Recovery") == 1 and "| moe |" in card and "| scratch |" in card
    assert "## Verification" in card  # appended, not replacing the card

    saved = load_model(tmp_path / "saved")
    assert saved.config.num_labels == 2 and type(saved).__name__ == "ViTMoEForImageClassification"
    x = torch.randn(2, 1, 28, 28)
    trained = load_model(tmp_path / "saved")
    torch.testing.assert_close(saved(pixel_values=x).logits, trained(pixel_values=x).logits)
    assert not torch.equal(saved.vit.encoder.layer[1].moe.experts.w1,
                           load_model(moe).vit.encoder.layer[1].moe.experts.w1)


def test_a_second_run_replaces_the_card_section(tiny, tmp_path):
    moe = make_moe(tiny, tmp_path, "vit")
    data = make_image_folder(tmp_path / "imgs", per_class=4)
    run(moe, data, steps=2, eval_every=1)
    run(moe, data, steps=3, eval_every=1, report=str(tmp_path / "elsewhere"))
    card = (moe / "README.md").read_text()
    assert card.count("## Recovery") == 1 and "3 steps" in card
    assert (tmp_path / "elsewhere" / "finetune.json").is_file()


def test_bert_moe_learns_text_labels(tiny, tmp_path):
    moe = make_moe(tiny, tmp_path, "bert")
    lines = [json.dumps({"text": ("cat sat " if i % 2 else "dogs ran ") * (2 + i % 3), "label": "ab" if i % 2 else "pq"})
             for i in range(40)]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    report = run(moe, tmp_path / "train.jsonl", seq_len=16)
    (moe_run,) = report.runs
    assert moe_run.eval[-1]["loss"] < moe_run.eval[0]["loss"]
    assert moe_run.eval[-1]["accuracy"] == 1.0
    assert report.data["classes"] == ["ab", "pq"] and report.data["tokenizer"] == "TokenizersBackend"


def test_mixtral_learns_a_text_file_and_same_seed_gives_same_curves(tiny, tmp_path):
    moe = make_moe(tiny, tmp_path, "llama")
    assert json.loads((moe / "config.json").read_text())["model_type"] == "mixtral"
    (tmp_path / "text.txt").write_text("the cat sat on the mat. " * 60)
    first = run(moe, tmp_path / "text.txt", seq_len=16, report=str(tmp_path / "r1"))
    second = run(moe, tmp_path / "text.txt", seq_len=16, report=str(tmp_path / "r2"))
    (a,), (b,) = first.runs, second.runs
    assert a.eval[-1]["loss"] < a.eval[0]["loss"]
    assert all("aux_loss" in s for s in a.train)  # Mixtral's router loss through output_router_logits
    assert a.train == b.train and a.eval == b.eval
    assert first.recovery["metric"] == "eval loss" and a.unit == "tokens"
    third = run(moe, tmp_path / "text.txt", seq_len=16, seed=1, report=str(tmp_path / "r3"))
    assert third.runs[0].train != a.train


def test_qwen2_moe_with_dense_layers_learns_a_text_file(tiny, tmp_path):
    """Partial conversion of a LLaMA model: a stock Qwen2-MoE with mlp_only_layers and a zero shared expert."""
    moe = make_moe(tiny, tmp_path, "llama", layers="every-2")
    config = json.loads((moe / "config.json").read_text())
    assert config["model_type"] == "qwen2_moe" and config["decoder_sparse_step"] == 2  # every-2
    (tmp_path / "text.txt").write_text("the cat sat on the mat. " * 60)
    (run_,) = run(moe, tmp_path / "text.txt", seq_len=16).runs
    assert run_.eval[-1]["loss"] < run_.eval[0]["loss"]
    assert all("aux_loss" in s for s in run_.train)  # Qwen2-MoE's router loss through output_router_logits


def test_compare_really_trains_the_dense_model(tiny, tmp_path):
    dense_dir = tiny("vit")
    data = load_task_data(str(make_image_folder(tmp_path / "imgs", per_class=6)),
                          json.loads((dense_dir / "config.json").read_text()), dense_dir)
    model = load_model(dense_dir)
    model.classifier = torch.nn.Linear(32, 2)
    model.config.num_labels = 2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = TrainSettings(steps=3, lr=1e-3, batch_size=4, eval_every=3, seed=0, aux_weight=0.01,
                             weight_decay=0.0, warmup_steps=0)
    accelerator = make_accelerator("cpu", "fp32")
    result, trained = train_run("dense", str(dense_dir), model, data, settings, accelerator)
    after = trained.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert "classifier.weight" in changed and any("fc1" in k or "intermediate" in k for k in changed)
    assert len(changed) > len(before) // 2
    assert result.eval[-1]["loss"] != result.eval[0]["loss"]


def test_data_with_one_class_is_refused(tiny, tmp_path):
    moe = make_moe(tiny, tmp_path, "vit")
    data = make_image_folder(tmp_path / "imgs", classes=1)
    with pytest.raises(UsageError, match=r"has only 1 class \('class0'\); classification needs at least 2 classes"):
        run(moe, data)
    assert not (moe / "finetune").exists()


def test_text_without_labels_is_refused(tiny, tmp_path):
    moe = make_moe(tiny, tmp_path, "bert")
    (tmp_path / "t.jsonl").write_text('{"text": "a", "label": 0}\n{"text": "b"}\n')
    with pytest.raises(UsageError) as err:
        run(moe, tmp_path / "t.jsonl")
    assert str(err.value) == f"{tmp_path / 't.jsonl'} line 2 has no 'label'; every line needs 'text' and 'label'"


def test_image_folder_without_class_subfolders_is_refused(tiny, tmp_path):
    moe = make_moe(tiny, tmp_path, "vit")
    (tmp_path / "flat").mkdir()
    with pytest.raises(UsageError, match="has no class subfolders; put each class's images in DATA/<label>/"):
        run(moe, tmp_path / "flat")


def test_option_problems_are_reported_together():
    problems = FinetuneOptions(data="x", steps=0, batch_size=0, device="tpu").problems()
    assert problems == [
        "--steps 0 trains nothing; use 1 or more steps",
        "--batch-size 0 must be at least 1",
        "--device 'tpu' is not one of auto, cpu, cuda",
    ]
