"""Expert-initialisation strategies: partitions reproduce the dense FFN, importance sampling
follows its scores, METIS parts are balanced, and every strategy runs on every family."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILY_MODELS
from transformers.activations import ACT2FN

from ckptforge import UpcycleOptions, upcycle, verify_model
from ckptforge.calibration import LayerStats
from ckptforge.errors import PlanError
from ckptforge.execute import expert_tensor, generator_for
from ckptforge.families import FAMILIES, detect_family
from ckptforge.io.source import open_checkpoint
from ckptforge.plan import build_plan
from ckptforge.strategies import STRATEGIES, DenseFFN, get_strategy
from ckptforge.strategies.graph import balance, partition_units


def _dense_ffn(path, layer: int = 1) -> tuple[DenseFFN, str]:
    ckpt = open_checkpoint(str(path))
    family = detect_family(ckpt.config)
    canonical = family.canonical_names(list(ckpt.tensors))
    names = family.ffn_names(family.base_prefix(set(canonical)), layer)
    weights = {role: ckpt.read(canonical[n]).float() for role, n in names.items() if n in canonical}
    return DenseFFN(weights), family.dims(ckpt.config).activation


def _ffn(weights: dict[str, torch.Tensor], act: str, x: torch.Tensor) -> torch.Tensor:
    f = ACT2FN[act]
    if "gate" in weights:
        h = f(x @ weights["gate"].T) * (x @ weights["up"].T)
    else:
        h = f(x @ weights["up"].T + weights.get("up_bias", 0))
    return h @ weights["down"].T + weights.get("down_bias", 0)


def _random_stats(d_ff: int, d: int, seed: int = 0) -> LayerStats:
    g = torch.Generator().manual_seed(seed)
    stats = LayerStats(d_ff, d, needs={"scores", "coactivation", "centroids"})
    for _ in range(3):
        x = torch.randn(40, d, generator=g)
        stats.update(torch.relu(torch.randn(40, d_ff, generator=g) + torch.linspace(-1, 1, d_ff)), x)
    return stats


class _Stats:
    def __init__(self, d_ff: int, d: int):
        self.s = _random_stats(d_ff, d)

    def layer(self, layer: int) -> LayerStats:
        return self.s


PARTITIONS = [("coactivation", {}), ("random", {"mode": "partition"}), ("granular", {})]


@pytest.mark.parametrize("family", sorted(FAMILY_MODELS))
@pytest.mark.parametrize("name,params", PARTITIONS, ids=[p[0] for p in PARTITIONS])
def test_partition_experts_sum_to_the_dense_ffn(tiny, family, name, params):
    ffn, act = _dense_ffn(tiny(FAMILY_MODELS[family]))
    strategy, e = get_strategy(name), 4
    assert not strategy.validate(params, ffn.intermediate_size, e, 2)
    sel = strategy.select(ffn, e, params, _random_stats(ffn.intermediate_size, ffn.hidden_size),
                          generator_for(0, 1, "select"))
    units = torch.cat([x.units for x in sel.experts])
    assert sorted(units.tolist()) == list(range(ffn.intermediate_size))  # disjoint and covering
    x = torch.randn(5, ffn.hidden_size, generator=torch.Generator().manual_seed(1))
    total = sum(_ffn({role: expert_tensor(ffn, sel, i, role, torch.Generator()) for role in ffn.weights}, act, x)
                for i in range(e))
    torch.testing.assert_close(total, _ffn(ffn.weights, act, x), rtol=1e-5, atol=1e-6)


def test_importance_follows_scores_without_replacement_and_is_seeded():
    scores = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 10.0])
    stats = LayerStats(6, 2)
    stats.sq = scores.double() ** 2  # l2 score = scores
    ffn = DenseFFN({"up": torch.zeros(6, 2)})
    strategy = get_strategy("importance")
    draws = strategy.select(ffn, 4000, {"expert_width": 1}, stats, torch.Generator().manual_seed(0))
    freq = torch.bincount(torch.cat([x.units for x in draws.experts]), minlength=6).double() / 4000
    expected = scores / scores.sum()
    assert freq[0] == 0  # a zero score is never drawn while positive ones remain
    assert (freq - expected).abs().max() < 0.03  # ≈ 4σ at n=4000
    wide = strategy.select(ffn, 50, {"expert_width": 5}, stats, torch.Generator().manual_seed(0))
    assert all(x.units.unique().numel() == 5 and 0 not in x.units.tolist() for x in wide.experts)
    again = strategy.select(ffn, 50, {"expert_width": 3}, stats, torch.Generator().manual_seed(7))
    same = strategy.select(ffn, 50, {"expert_width": 3}, stats, torch.Generator().manual_seed(7))
    other = strategy.select(ffn, 50, {"expert_width": 3}, stats, torch.Generator().manual_seed(8))
    assert all(torch.equal(a.units, b.units) for a, b in zip(again.experts, same.experts))
    assert any(not torch.equal(a.units, b.units) for a, b in zip(again.experts, other.experts))


@pytest.mark.parametrize("threshold", ["zero", "p90"])
def test_coactivation_counts_equal_brute_force(threshold):
    g = torch.Generator().manual_seed(0)
    stats = LayerStats(12, 3, threshold=threshold, needs={"scores", "coactivation"})
    brute = torch.zeros(12, 12)
    for _ in range(3):
        acts = torch.randn(9, 12, generator=g)
        stats.update(acts)
        tau = 0.0 if threshold == "zero" else acts.flatten().sort().values[round(0.9 * acts.numel()) - 1]
        for token in acts:
            fired = (token > tau).float()
            brute += torch.outer(fired, fired)
    brute.fill_diagonal_(0)
    assert torch.equal(stats.coactivation, brute)
    assert stats.tokens == 27


def test_metis_parts_are_balanced_disjoint_and_cover():
    stats = _random_stats(96, 4)
    parts = partition_units(stats.coactivation, 8)
    assert [p.numel() for p in parts] == [12] * 8
    assert sorted(torch.cat(parts).tolist()) == list(range(96))


def test_balance_fills_empty_parts():
    # METIS returned empty parts on real graphs at 32/64 parts; balance must fill them
    parts = torch.tensor([0] * 6 + [1] * 2)
    affinity = torch.zeros(8, 4)
    affinity[6, 3] = 5.0
    out = balance(parts, 4, affinity)
    assert torch.bincount(out, minlength=4).tolist() == [2, 2, 2, 2]
    assert out[7] == 1 and out[6] == 1  # part 1 was not oversized: its units stay


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_runs_on_every_family(tiny, tmp_path, family, name):
    src = tiny(FAMILY_MODELS[family])
    ffn, _ = _dense_ffn(src)
    options = UpcycleOptions(num_experts=4, top_k=2, layers="all", strategy=name)
    result = upcycle(src, tmp_path / "moe", options, stats=_Stats(ffn.intermediate_size, ffn.hidden_size))
    report = verify_model(tmp_path / "moe")
    assert report.final.relative == report.final.relative  # finite, not NaN
    if name == "copy-all":
        assert report.passed
    width = result.plan.expert_width
    assert all(len(u) == 4 and all(x.numel() == width for x in u) for u in result.expert_units.values())


def _plan_problems(tiny, **options) -> list[str]:
    with pytest.raises(PlanError) as err:
        build_plan(open_checkpoint(str(tiny("vit"))), UpcycleOptions(**options))
    return err.value.problems


def test_bad_widths_parts_and_missing_calibration(tiny):
    assert _plan_problems(tiny, num_experts=4, strategy="random", strategy_params={"expert_width": 65}) == [
        "--expert-width 65 is outside 1..64 (the dense FFN has d_ff=64); choose a width in that range or use --expert-ratio"]
    assert _plan_problems(tiny, num_experts=4, strategy="uniform", strategy_params={"expert_width": 0})[0].startswith(
        "--expert-width 0 is outside 1..64")
    assert _plan_problems(tiny, num_experts=4, strategy="coactivation", strategy_params={"parts": 2},
                          calibration="x") == [
        "--parts 2 is fewer than --experts 4; partition mode needs at least one part per expert: "
        "use --parts 4 or leave it out"]
    # issue 12: importance alone now scores from the weights; the activation score still needs data
    assert _plan_problems(tiny, num_experts=4, strategy="importance", strategy_params={"score": "activation"}) == [
        "--strategy importance needs activation statistics; pass --calibration PATH "
        "(a folder of images, a .txt/.jsonl file or a dataset)"]
    assert _plan_problems(tiny, num_experts=3, strategy="coactivation", calibration="x") == [
        "d_ff=64 is not divisible by --experts 3, which partition mode needs; use a divisor of 64 "
        "or --coactivation-mode sample"]
    assert _plan_problems(tiny, num_experts=6, strategy="granular", strategy_params={"expert_width": 16}) == [
        "granular makes 4 slices of width 16; --experts 6 is not a multiple of 4: use --experts 4 "
        "(or a multiple) or a wider --expert-width"]


def test_llama_output_scale_is_folded_into_down_weights(tiny, tmp_path):
    src = tiny("llama")
    ffn, _ = _dense_ffn(src, layer=0)
    options = UpcycleOptions(num_experts=4, top_k=2, layers="all", strategy="granular")
    upcycle(src, tmp_path / "moe", options, stats=_Stats(64, 32))
    from safetensors.torch import load_file

    out = load_file(tmp_path / "moe" / "model.safetensors")
    down = out["model.layers.0.block_sparse_moe.experts.1.w2.weight"]
    torch.testing.assert_close(down, ffn.weights["down"][:, 16:32] * 2)  # output scale k = 2
