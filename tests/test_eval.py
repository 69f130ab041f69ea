"""``eval`` on tiny models: the metric equals a forward pass done by hand, the capacity sweep spends
fewer FLOPs at smaller C (and exactly the no-capacity FLOPs at a huge C), BPR changes what a short
capacity keeps, and bad inputs exit 2 with the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from calib_helpers import add_tokenizer

import ckptforge
from ckptforge.config import router_settings
from ckptforge.datasets import load_task_data
from ckptforge.errors import PlanError, UsageError
from ckptforge.evaluate import EvalOptions, evaluate, parse_capacity_factors, plot_sweep
from ckptforge.loading import load_model

from conftest import run_cli
from test_finetune import make_image_folder


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("eval") / "imgs", classes=4, per_class=6)


def _moe(tiny, tmp_path: Path, kind: str = "vit", labels: int = 4, **router) -> Path:
    out = tmp_path / f"moe-{kind}-{router.get('type', 'topk')}"
    dense = tiny(kind, num_labels=labels)
    ckptforge.upcycle(dense if kind == "vit" else add_tokenizer(dense), out, ckptforge.UpcycleOptions(
        num_experts=4, top_k=2, layers="all", router=router_settings(router.pop("type", "topk"), **router),
        router_init_std=1.0, seed=0))
    return out


def _by_hand(model_dir: Path, data: str) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of a plain forward over every image."""
    config = json.loads((model_dir / "config.json").read_text())
    td = load_task_data(data, config, model_dir, eval_fraction=1.0)
    model = load_model(model_dir)
    pixels, target = td.eval.tensors
    with torch.no_grad():
        logits = model(pixel_values=pixels).logits
    return (logits.argmax(-1) == target).float().mean().item(), torch.nn.functional.cross_entropy(logits, target).item()


def test_dense_source_metric_is_a_plain_forward(tiny, images):
    dense = tiny("vit", num_labels=4)
    report = evaluate(dense, EvalOptions(data=str(images)))
    (row,) = report.rows
    acc, loss = _by_hand(dense, str(images))
    assert report.metric == "accuracy" and report.router is None
    assert row.accuracy == pytest.approx(acc) and row.loss == pytest.approx(loss, rel=1e-5)
    assert row.examples == 24 and row.expert_flops_per_example is None and row.flops_per_example > 0


def test_capacity_sweep_flops_fall_with_c_and_match_no_capacity_at_huge_c(tiny, tmp_path, images):
    moe = _moe(tiny, tmp_path)
    report = evaluate(moe, EvalOptions(data=str(images), capacity_factors=[0.25, 0.5, 1.0, 1000.0], batch_size=8))
    rows = {(r.capacity_factor, r.bpr): r for r in report.rows}
    assert report.rows[0].capacity_factor is None and len(report.rows) == 9
    for bpr in (True, False):
        flops = [rows[(c, bpr)].expert_flops_per_example for c in (0.25, 0.5, 1.0)]
        assert flops[0] < flops[1] < flops[2] <= report.rows[0].expert_flops_per_example
        totals = [rows[(c, bpr)].flops_per_example for c in (0.25, 0.5, 1.0)]
        assert totals[0] < totals[1] < totals[2]
        huge = rows[(1000.0, bpr)]
        assert huge.expert_flops_per_example == report.rows[0].expert_flops_per_example
        assert huge.flops_per_example == report.rows[0].flops_per_example
        assert huge.loss == report.rows[0].loss and huge.kept_assignments == 1.0
    # without capacity every token of the 4 MoE layers goes to k=2 copy-all experts (d 32, S 64)
    tokens = 17 * 4  # (28/7)² patches + CLS, in 4 layers
    assert report.rows[0].expert_flops_per_example == tokens * 2 * 4 * 32 * 64
    assert rows[(0.25, True)].kept_assignments == pytest.approx(0.25, abs=0.02)


def test_bpr_changes_what_a_short_capacity_keeps(tiny, tmp_path, images):
    moe = _moe(tiny, tmp_path)
    report = evaluate(moe, EvalOptions(data=str(images), capacity_factors=[0.25, 1000.0], batch_size=24))
    rows = {(r.capacity_factor, r.bpr): r for r in report.rows}
    assert rows[(0.25, True)].loss != rows[(0.25, False)].loss
    assert rows[(0.25, True)].kept_assignments <= 0.26 and rows[(0.25, False)].kept_assignments <= 0.26
    assert rows[(1000.0, True)].loss == rows[(1000.0, False)].loss


def test_one_bpr_setting_and_mh_router(tiny, tmp_path, images):
    moe = _moe(tiny, tmp_path, type="mh", heads=2)
    report = evaluate(moe, EvalOptions(data=str(images), capacity_factors=[0.5, 2.0], bpr=False))
    assert [(r.capacity_factor, r.bpr) for r in report.rows] == [(None, None), (0.5, False), (2.0, False)]
    assert report.rows[1].expert_flops_per_example < report.rows[2].expert_flops_per_example
    assert report.router == "mh"


def test_held_out_is_the_split_finetune_evaluates_on(tiny, images):
    dense = tiny("vit", num_labels=4)
    report = evaluate(dense, EvalOptions(data=str(images), held_out=True, seed=3))
    config = json.loads((dense / "config.json").read_text())
    expected = load_task_data(str(images), config, dense, seed=3).eval
    assert report.rows[0].examples == len(expected) == 2


def test_causal_lm_loss_and_bert_accuracy(tiny, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    mixtral = tmp_path / "mixtral"
    ckptforge.upcycle(add_tokenizer(tiny("llama")), mixtral, ckptforge.UpcycleOptions(num_experts=4, layers="all"))
    report = evaluate(mixtral, EvalOptions(data=str(text), seq_len=16))
    assert report.metric == "loss" and not report.higher_is_better and report.router == "mixtral"
    assert 0 < report.rows[0].loss < 10 and report.rows[0].expert_flops_per_example is None
    rows = tmp_path / "l.jsonl"
    rows.write_text("".join(json.dumps({"text": t, "label": t[0]}) + "\n" for t in ["ab cd", "ba dc", "ab ab", "ba ba"]))
    bert = _moe(tiny, tmp_path, "bert", labels=2)
    report = evaluate(bert, EvalOptions(data=str(rows), capacity_factors=[0.5], seq_len=8))
    assert report.task == "sequence-classification" and len(report.rows) == 3
    assert report.rows[1].expert_flops_per_example < report.rows[0].expert_flops_per_example


def test_plot_has_both_panels(tiny, tmp_path, images):
    moe = _moe(tiny, tmp_path)
    report = evaluate(moe, EvalOptions(data=str(images), capacity_factors=[0.5, 1.0]))
    path = plot_sweep([report, report], tmp_path / "sweep.png")
    assert path.stat().st_size > 10_000


def test_option_problems():
    with pytest.raises(PlanError) as err:
        evaluate("unused", EvalOptions(data="x", capacity_factors=[0.0], batch_size=0))
    assert "--capacity-factor 0 must be a positive number" in str(err.value)
    assert "--batch-size 0 must be at least 1" in str(err.value)
    with pytest.raises(UsageError, match="not a comma-separated list"):
        parse_capacity_factors("0.5,half")
    with pytest.raises(PlanError, match="add --capacity-factor"):
        evaluate("unused", EvalOptions(data="x", bpr=False))


def test_cli_json_png_and_refusals(tiny, tmp_path, images):
    moe = _moe(tiny, tmp_path)
    png = tmp_path / "out.png"
    done = run_cli("eval", str(moe), "--data", str(images), "--capacity-factor", "0.5,1", "--no-bpr",
                   "--out", str(png), "--json")
    assert done.returncode == 0, done.stderr
    payload = json.loads(done.stdout)
    assert [r["capacity_factor"] for r in payload["rows"]] == [None, 0.5, 1.0] and png.is_file()
    assert payload["plot"] == str(png)

    soft = _moe(tiny, tmp_path, type="soft")
    done = run_cli("eval", str(soft), "--data", str(images), "--capacity-factor", "0.5")
    assert done.returncode == 2 and done.stdout == ""
    assert "its router is 'soft'; routers that accept it: topk, mh" in done.stderr
    dense = tiny("vit", num_labels=4)
    done = run_cli("eval", str(dense), "--data", str(images), "--capacity-factor", "0.5", "--json")
    assert done.returncode == 2 and "it is a dense vit model with no router" in json.loads(done.stdout)["error"]
    done = run_cli("eval", str(dense), "--data", str(images), "--bpr")
    assert done.returncode == 2 and "add --capacity-factor" in done.stderr
    ten = tiny("vit", name="ten-labels")
    done = run_cli("eval", str(ten), "--data", str(images))
    assert done.returncode == 2 and "has 4 classes (class0, class1, class2, class3), the model 10 labels" in done.stderr
