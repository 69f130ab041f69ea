"""Compare expert-initialisation strategies on one checkpoint and one calibration set.

Statistics are collected once on the first samples; every strategy then converts with its default
parameters and router init, and is measured on the held-out samples: init gap (relative L2 error
of the final output vs the dense model), expert overlap (mean pairwise Jaccard of the experts'
unit sets), coverage (fraction of hidden units some expert uses) and the time its conversion took.

    >>> report = compare_strategies("dense-vit", "imgs/", num_experts=4, top_k=2)   # doctest: +SKIP
    >>> [row.strategy for row in report.rows]                                        # doctest: +SKIP
    ['copy-all', 'random', 'uniform', 'importance', 'coactivation', 'granular']
"""

from __future__ import annotations

import itertools
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ckptforge.calibration import collect_stats, dense_weights_path
from ckptforge.calibration_data import CalibrationSet, load_calibration
from ckptforge.config import UpcycleOptions, parse_layers
from ckptforge.errors import CalibrationError, UsageError
from ckptforge.execute import upcycle
from ckptforge.families import detect_family
from ckptforge.io.source import open_checkpoint
from ckptforge.loading import load_model
from ckptforge.strategies import STRATEGIES
from ckptforge.strategy_settings import DATA_FREE_SCORE_NAMES, flag_of, owners_of


@dataclass
class StrategyRow:
    """One strategy's numbers (``error`` instead when its defaults do not fit the checkpoint)."""

    strategy: str
    expert_width: int | None = None
    init_gap: float | None = None
    overlap: float | None = None
    coverage: float | None = None
    seconds: float | None = None
    error: str | None = None
    #: the strategy parameters this row used beyond the shared ones (e.g. ``{"score": "weight-norm"}``)
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class Comparison:
    source: str
    num_experts: int
    top_k: int
    moe_layers: list[int]
    calibration: dict[str, Any]
    heldout_samples: int
    stats_seconds: float
    rows: list[StrategyRow] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare_strategies(source: str | Path, calibration: str | Path, *, num_experts: int = 8, top_k: int = 2,
                       layers: str = "every-2", strategies: list[str] | None = None, samples: int = 256,
                       batch_size: int = 16, heldout: float = 0.25, seed: int = 0,
                       strategy_params: dict[str, Any] | None = None) -> Comparison:
    """Convert ``source`` with every strategy (default: all registered) and measure each one.

    ``strategy_params`` (upcycle's strategy options) go to the strategies that take them; each strategy's
    ``compare_variants`` add rows (importance: its data-free score beside the activation score).
    """
    names = strategies or list(STRATEGIES)
    unknown = [n for n in names if n not in STRATEGIES]
    if unknown:
        raise UsageError(f"unknown strategy {unknown[0]!r}; choose from: {', '.join(STRATEGIES)}")
    if not 0 < heldout < 1:
        raise UsageError(f"--heldout {heldout} is outside (0, 1); use e.g. 0.25")
    unused = sorted(set(strategy_params or {}) - {p for n in names for p in STRATEGIES[n].params})
    if unused:  # issue 12: a strategy option is taken by a compared strategy or refused, never ignored
        raise UsageError(f"{flag_of(unused[0])} applies to none of the compared strategies ({', '.join(names)}); it is "
                         f"a setting of {owners_of(unused[0]) or 'no strategy'}: add that strategy to --strategies or drop it")
    ckpt = open_checkpoint(str(source))
    family = detect_family(ckpt.config)
    try:
        moe_layers = parse_layers(layers, family.dims(ckpt.config).num_layers)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    data = load_calibration(calibration, ckpt, family.modality, samples=samples, batch_size=batch_size, seed=seed)
    n_held = max(1, round(heldout * data.num_samples))
    if data.num_samples - n_held < 1:
        raise CalibrationError(f"calibration data '{calibration}' has {data.num_samples} sample(s); "
                               "compare-strategies needs at least 2 (some are held out)")
    start = time.perf_counter()
    stats = collect_stats(ckpt, data, moe_layers, needs={"scores", "coactivation", "centroids"},
                          stop=data.num_samples - n_held)
    stats_seconds = time.perf_counter() - start
    dense_out = _final_outputs(load_model(dense_weights_path(ckpt), ckpt.config), data, n_held)
    report = Comparison(ckpt.source, num_experts, top_k, moe_layers, stats.calibration, n_held,
                        round(stats_seconds, 3))
    with tempfile.TemporaryDirectory(prefix="ckptforge-compare-") as tmp:
        for i, (name, variant) in enumerate(_runs(names, strategy_params or {})):
            options = UpcycleOptions(num_experts=num_experts, top_k=top_k, layers=layers, strategy=name, seed=seed,
                                     strategy_params=variant)
            row = _measure(source, Path(tmp) / f"{i}-{name}", options, stats, data, n_held, dense_out)
            row.params = {k: v for k, v in variant.items() if (strategy_params or {}).get(k) != v}
            report.rows.append(row)
    ckpt.close()
    return report


def _runs(names: list[str], shared: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(strategy, params) per row: the shared params, then each of the strategy's compare variants."""
    runs = []
    for name in names:
        own = {k: v for k, v in shared.items() if k in STRATEGIES[name].params}  # the options it takes
        runs.append((name, own))
        for variant in STRATEGIES[name].compare_variants:
            params = {**own, **variant}
            if params.get("score") in DATA_FREE_SCORE_NAMES:
                params.pop("metric", None)  # a data-free score has no activation metric
            if params != own:
                runs.append((name, params))
    return runs


def _measure(source: str | Path, out: Path, options: UpcycleOptions, stats: Any, data: CalibrationSet,
             n_held: int, dense_out: torch.Tensor) -> StrategyRow:
    start = time.perf_counter()
    try:
        result = upcycle(source, out, options, stats=stats)
    except UsageError as exc:
        return StrategyRow(options.strategy, error=str(exc))
    seconds = time.perf_counter() - start
    moe_out = _final_outputs(load_model(out, result.plan.output_config), data, n_held)
    gap = ((moe_out - dense_out).norm() / dense_out.norm().clamp(min=1e-30)).item()
    d_ff = result.plan.dims.intermediate_size
    overlap = [expert_overlap(units) for units in result.expert_units.values()]
    coverage = [expert_coverage(units, d_ff) for units in result.expert_units.values()]
    return StrategyRow(options.strategy, result.plan.expert_width, round(gap, 6),
                       round(sum(overlap) / len(overlap), 6), round(sum(coverage) / len(coverage), 6),
                       round(seconds, 3))


def expert_overlap(units: list[torch.Tensor]) -> float:
    """Mean pairwise Jaccard index |A∩B| / |A∪B| of the experts' unit sets (1: all identical).

        >>> expert_overlap([torch.tensor([0, 1]), torch.tensor([1, 2])])
        0.3333333333333333
    """
    sets = [set(u.tolist()) for u in units]
    pairs = [len(a & b) / len(a | b) for a, b in itertools.combinations(sets, 2)]
    return sum(pairs) / len(pairs) if pairs else 1.0


def expert_coverage(units: list[torch.Tensor], intermediate_size: int) -> float:
    """Fraction of the d_ff hidden units that at least one expert uses.

        >>> expert_coverage([torch.tensor([0, 1]), torch.tensor([1, 2])], 4)
        0.75
    """
    return torch.cat(units).unique().numel() / intermediate_size


def _final_outputs(model: torch.nn.Module, data: CalibrationSet, n_held: int) -> torch.Tensor:
    outs = []
    with torch.no_grad():
        for batch in data.batches(data.num_samples - n_held):
            out = model(**batch)
            final = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
            mask = batch.get("attention_mask")
            if mask is not None and final.dim() >= 3 and final.shape[1] == mask.shape[1]:
                final = final * mask[..., None].to(final.dtype)  # padded positions do not count
            outs.append(final.double().reshape(final.shape[0], -1))
    return torch.cat(outs)

