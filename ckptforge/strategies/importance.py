"""importance (MoE Jetpack's default): a score per hidden unit from calibration activations
(``metric`` l2 — the norm over all tokens —, l1 or count of positive activations) or, without
calibration data, from the weights (``score``: see :data:`DATA_FREE_SCORES`); p = s/Σs; each
expert draws S units with ``multinomial(p, S, replacement=False)``, sorted.

    >>> import torch
    >>> p = importance_probabilities(torch.tensor([1.0, 3.0]))
    >>> p.tolist()
    [0.25, 0.75]
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # torch loads when a strategy selects units, not when a plan reads its metadata
    import torch

from ckptforge.strategy_settings import DATA_FREE_SCORE_NAMES, ImportanceSettings

from .base import DenseFFN, ExpertInit, LayerSelection
from .subset import SubsetStrategy


def _row_norms(ffn: DenseFFN, *roles: str) -> torch.Tensor:
    import torch

    out = torch.ones(ffn.intermediate_size, dtype=torch.float64)
    for role in roles:
        if role in ffn.weights:
            w = ffn.weights[role].double()
            out = out * (w.norm(dim=0) if role == "down" else w.norm(dim=1))
    return out


#: Data-free unit scores, from the weights alone (``--importance-score``): ``weight-norm``
#: ‖W1[i]‖·‖W2[:, i]‖ (gated: ‖Wg[i]‖·‖Wu[i]‖·‖Wd[:, i]‖), ``down-norm`` ‖W2[:, i]‖.
DATA_FREE_SCORES: dict[str, Callable[[DenseFFN], torch.Tensor]] = {
    "weight-norm": lambda ffn: _row_norms(ffn, "up", "gate", "down"),
    "down-norm": lambda ffn: _row_norms(ffn, "down"),
}
if tuple(DATA_FREE_SCORES) != DATA_FREE_SCORE_NAMES:  # the names --help shows (strategy_settings.py, torch-free)
    raise ImportError(f"strategy_settings.DATA_FREE_SCORE_NAMES {DATA_FREE_SCORE_NAMES} != {tuple(DATA_FREE_SCORES)}")
#: The data-free score used when no calibration data is given (``ImportanceSettings.data_free_score``):
#: of the data-free scores it started closest to dense on examples/tiny-vit-mnist (E=4, k=2,
#: every-2; compare-strategies init gap, mean of seeds 0-3: weight-norm 0.0878, down-norm 0.1102;
#: activation l2 0.0865, random 0.1239).
DEFAULT_DATA_FREE_SCORE = ImportanceSettings.data_free_score


def importance_probabilities(scores: torch.Tensor) -> torch.Tensor:
    """p = s/Σs in float64 (uniform when every score is zero)."""
    import torch

    s = scores.double().clamp(min=0)
    total = s.sum()
    return s / total if total > 0 else torch.full_like(s, 1 / s.numel())


class Importance(SubsetStrategy):
    name = "importance"
    needs_stats = True
    summary = "experts sample units in proportion to their calibration activation score (MoE Jetpack)"
    compare_variants = ({"score": DEFAULT_DATA_FREE_SCORE},)
    settings = ImportanceSettings

    def resolve_params(self, params: dict[str, Any], has_data: bool) -> dict[str, Any]:
        """Without calibration data (and no ``score`` chosen) the data-free default score."""
        if has_data or "score" in params:
            return params
        return {**params, "score": DEFAULT_DATA_FREE_SCORE}

    def stats_needed(self, params: dict[str, Any]) -> set[str]:
        return {"scores"} if self.settings_of(params).score == "activation" else set()

    def validate(self, params: dict[str, Any], intermediate_size: int, num_experts: int, top_k: int) -> list[str]:
        problems = super().validate(params, intermediate_size, num_experts, top_k)
        if self.settings_of(params).score in DATA_FREE_SCORES and "metric" in params:
            problems.append("--metric applies to --importance-score activation only (it scores calibration "
                            "activations); drop it or pass --calibration")
        return problems

    def select(self, ffn: DenseFFN, num_experts: int, params: dict[str, Any], stats: Any,
               generator: torch.Generator) -> LayerSelection:
        import torch

        d_ff = ffn.intermediate_size
        width, settings = self.expert_width(params, d_ff, num_experts), self.settings_of(params)
        score, metric = settings.score, settings.metric
        scores = stats.score(metric) if score == "activation" else DATA_FREE_SCORES[score](ffn)
        p = importance_probabilities(scores)
        # units with zero score are drawn last, never instead of a unit with a positive score
        p = p + (p == 0).double() * 1e-300
        sets = [torch.multinomial(p, width, replacement=False, generator=generator).sort().values
                for _ in range(num_experts)]
        top = p.topk(width).values.sum().item()
        return LayerSelection([ExpertInit(s) for s in sets],
                              summary={**({"metric": metric} if score == "activation" else {"score": score}),
                                       "top_width_score_mass": round(top, 6)})
