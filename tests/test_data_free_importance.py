"""Issue 12, defect "the headline command asks for data it could do without": importance without
--calibration scores units from the weights, says so in one stderr line, records the score in the
card and ckptforge.json; compare-strategies shows both scores; --importance-score chooses."""

from __future__ import annotations

import json

import torch

from ckptforge.compare import compare_strategies
from ckptforge.strategies.importance import DATA_FREE_SCORES, DEFAULT_DATA_FREE_SCORE
from conftest import REPO, run_cli

EXAMPLE = str(REPO / "examples" / "tiny-vit-mnist")
SAMPLES = str(REPO / "examples" / "mnist-samples")


def test_importance_without_calibration_uses_a_data_free_score(tmp_path):
    out = tmp_path / "moe"
    proc = run_cli("upcycle", EXAMPLE, "--experts", "4", "--strategy", "importance", "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == (
        f"note: no --calibration, so --strategy importance scores units from the weights (--importance-score "
        f"{DEFAULT_DATA_FREE_SCORE}); pass --calibration PATH for activation scores")
    meta = json.loads((out / "ckptforge.json").read_text())
    assert meta["options"]["strategy_params"] == {"score": DEFAULT_DATA_FREE_SCORE}
    assert f"| unit score | `{DEFAULT_DATA_FREE_SCORE}`: data-free" in (out / "README.md").read_text()


def test_a_chosen_score_is_used_silently_and_a_bad_one_is_refused(tmp_path):
    out = tmp_path / "moe"
    proc = run_cli("upcycle", EXAMPLE, "--experts", "4", "--strategy", "importance", "--importance-score", "weight-norm",
                   "--out", str(out), "--quiet")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert json.loads((out / "ckptforge.json").read_text())["options"]["strategy_params"] == {"score": "weight-norm"}
    bad = run_cli("upcycle", EXAMPLE, "--strategy", "importance", "--importance-score", "magic", "--dry-run")
    assert bad.returncode == 2
    assert "--importance-score 'magic' is not one of activation, " in bad.stderr
    metric = run_cli("upcycle", EXAMPLE, "--strategy", "importance", "--metric", "l1", "--dry-run")
    assert metric.returncode == 2 and "--metric applies to --importance-score activation only" in metric.stderr


def test_weight_norm_is_the_product_of_the_unit_weight_norms():
    from ckptforge.strategies import DenseFFN

    up, down = torch.randn(6, 3), torch.randn(3, 6)
    ffn = DenseFFN({"up": up, "down": down})
    expected = up.double().norm(dim=1) * down.double().norm(dim=0)
    assert torch.allclose(DATA_FREE_SCORES["weight-norm"](ffn), expected)
    assert torch.allclose(DATA_FREE_SCORES["down-norm"](ffn), down.double().norm(dim=0))


def test_compare_strategies_shows_both_scores():
    report = compare_strategies(EXAMPLE, SAMPLES, num_experts=4, top_k=2, strategies=["importance"], samples=24)
    rows = [(r.strategy, r.params) for r in report.rows]
    assert rows == [("importance", {}), ("importance", {"score": DEFAULT_DATA_FREE_SCORE})]
    assert all(r.error is None and r.init_gap > 0 for r in report.rows)
