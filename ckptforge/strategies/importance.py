"""importance (MoE Jetpack's default): a score per hidden unit from calibration activations
(``metric`` l2 — the norm over all tokens —, l1 or count of positive activations) or, without
calibration data, from the weights (``score``: see :data:`DATA_FREE_SCORES`); p = s/Σs; each
expert draws S units with ``multinomial(p, S, replacement=False)``, sorted.

    >>> p = importance_probabilities(torch.tensor([1.0, 3.0]))
    >>> p.tolist()
    [0.25, 0.75]
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ckptforge.config import DATA_FREE_SCORE_NAMES, DEFAULT_DATA_FREE_SCORE

from .base import DenseFFN, ExpertInit, LayerSelection
from .subset import SubsetStrategy

METRICS = ("l2", "l1", "count")


def _row_norms(ffn: DenseFFN, *roles: str) -> torch.Tensor:
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
if tuple(DATA_FREE_SCORES) != DATA_FREE_SCORE_NAMES:  # the names --help shows (config.py, torch-free)
    raise ImportError(f"config.DATA_FREE_SCORE_NAMES {DATA_FREE_SCORE_NAMES} != {tuple(DATA_FREE_SCORES)}")
#: DEFAULT_DATA_FREE_SCORE (config.py) is the data-free score used when no calibration data is
#: given: of the data-free scores it started closest to dense on examples/tiny-vit-mnist (E=4, k=2,
#: every-2; compare-strategies init gap, mean of seeds 0-3: weight-norm 0.0878, down-norm 0.1102;
#: activation l2 0.0865, random 0.1239).
#: ``activation``: MoE Jetpack's score from calibration activations (``metric``).
SCORES = ("activation", *DATA_FREE_SCORES)


def importance_probabilities(scores: torch.Tensor) -> torch.Tensor:
    """p = s/Σs in float64 (uniform when every score is zero)."""
    s = scores.double().clamp(min=0)
    total = s.sum()
    return s / total if total > 0 else torch.full_like(s, 1 / s.numel())


class Importance(SubsetStrategy):
    name = "importance"
    needs_stats = True
    summary = "experts sample units in proportion to their calibration activation score (MoE Jetpack)"
    compare_variants = ({"score": DEFAULT_DATA_FREE_SCORE},)
    params = (*SubsetStrategy.params, "metric", "score")

    def resolve_params(self, params: dict[str, Any], has_data: bool) -> dict[str, Any]:
        """Without calibration data (and no ``score`` chosen) the data-free default score."""
        if has_data or "score" in params:
            return params
        return {**params, "score": DEFAULT_DATA_FREE_SCORE}

    def stats_needed(self, params: dict[str, Any]) -> set[str]:
        return {"scores"} if params.get("score", "activation") == "activation" else set()

    def validate(self, params: dict[str, Any], intermediate_size: int, num_experts: int, top_k: int) -> list[str]:
        problems = super().validate(params, intermediate_size, num_experts, top_k)
        if params.get("metric", "l2") not in METRICS:
            problems.append(f"--metric {params['metric']!r} is not one of {', '.join(METRICS)}")
        if params.get("score", "activation") not in SCORES:
            problems.append(f"--importance-score {params['score']!r} is not one of {', '.join(SCORES)}")
        elif params.get("score", "activation") != "activation" and "metric" in params:
            problems.append("--metric applies to --importance-score activation only (it scores calibration "
                            "activations); drop it or pass --calibration")
        return problems

    def select(self, ffn: DenseFFN, num_experts: int, params: dict[str, Any], stats: Any,
               generator: torch.Generator) -> LayerSelection:
        d_ff = ffn.intermediate_size
        width = self.expert_width(params, d_ff, num_experts)
        score = params.get("score", "activation")
        scores = stats.score(params.get("metric", "l2")) if score == "activation" else DATA_FREE_SCORES[score](ffn)
        p = importance_probabilities(scores)
        # units with zero score are drawn last, never instead of a unit with a positive score
        p = p + (p == 0).double() * 1e-300
        sets = [torch.multinomial(p, width, replacement=False, generator=generator).sort().values
                for _ in range(num_experts)]
        top = p.topk(width).values.sum().item()
        return LayerSelection([ExpertInit(s) for s in sets],
                              summary={**({"metric": params.get("metric", "l2")} if score == "activation" else {"score": score}),
                                       "top_width_score_mass": round(top, 6)})
