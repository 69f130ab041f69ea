"""importance (MoE Jetpack's default): a score per hidden unit from calibration activations
(``metric`` l2 — the norm over all tokens —, l1 or count of positive activations); p = s/Σs; each
expert draws S units with ``multinomial(p, S, replacement=False)``, sorted.

    >>> p = importance_probabilities(torch.tensor([1.0, 3.0]))
    >>> p.tolist()
    [0.25, 0.75]
"""

from __future__ import annotations

from typing import Any

import torch

from .base import DenseFFN, ExpertInit, LayerSelection
from .subset import SubsetStrategy

METRICS = ("l2", "l1", "count")


def importance_probabilities(scores: torch.Tensor) -> torch.Tensor:
    """p = s/Σs in float64 (uniform when every score is zero)."""
    s = scores.double().clamp(min=0)
    total = s.sum()
    return s / total if total > 0 else torch.full_like(s, 1 / s.numel())


class Importance(SubsetStrategy):
    name = "importance"
    needs_stats = True
    summary = "experts sample units in proportion to their calibration activation score (MoE Jetpack)"

    def stats_needed(self, params: dict[str, Any]) -> set[str]:
        return {"scores"}

    def validate(self, params: dict[str, Any], intermediate_size: int, num_experts: int, top_k: int) -> list[str]:
        problems = super().validate(params, intermediate_size, num_experts, top_k)
        if params.get("metric", "l2") not in METRICS:
            problems.append(f"--metric {params['metric']!r} is not one of {', '.join(METRICS)}")
        return problems

    def select(self, ffn: DenseFFN, num_experts: int, params: dict[str, Any], stats: Any,
               generator: torch.Generator) -> LayerSelection:
        d_ff = ffn.intermediate_size
        width = self.expert_width(params, d_ff, num_experts)
        p = importance_probabilities(stats.score(params.get("metric", "l2")))
        # units with zero score are drawn last, never instead of a unit with a positive score
        p = p + (p == 0).double() * 1e-300
        sets = [torch.multinomial(p, width, replacement=False, generator=generator).sort().values
                for _ in range(num_experts)]
        top = p.topk(width).values.sum().item()
        return LayerSelection([ExpertInit(s) for s in sets],
                              summary={"metric": params.get("metric", "l2"), "top_width_score_mass": round(top, 6)})
