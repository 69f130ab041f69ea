"""copy-all (sparse upcycling): every expert is the whole dense FFN.

Options: ``noise_std`` (Gaussian noise on every expert weight) and ``drop_ratio``
(Drop-Upcycling: each expert re-draws that fraction of its hidden units, r = 0.5 in the paper).
"""

from __future__ import annotations

from typing import Any

import torch

from .base import DenseFFN, ExpertInit, LayerSelection, Strategy


class CopyAll(Strategy):
    params = ("noise_std", "drop_ratio")
    name = "copy-all"
    summary = "every expert copies the dense FFN (sparse upcycling); optional noise / Drop-Upcycling"

    def validate(self, params: dict[str, Any], intermediate_size: int, num_experts: int, top_k: int) -> list[str]:
        problems = []
        ratio = params.get("drop_ratio", 0.0)
        if not 0.0 <= ratio <= 1.0:
            problems.append(f"--drop-ratio {ratio} is outside [0, 1]; use e.g. 0.5 (Drop-Upcycling)")
        if params.get("noise_std", 0.0) < 0:
            problems.append(f"--noise-std {params['noise_std']} is negative; use 0 or a small positive std")
        return problems

    def exact(self, params: dict[str, Any]) -> bool:
        return not params.get("noise_std") and not params.get("drop_ratio")

    def select(self, ffn: DenseFFN, num_experts: int, params: dict[str, Any], stats: Any,
               generator: torch.Generator) -> LayerSelection:
        d_ff = ffn.intermediate_size
        units = torch.arange(d_ff)
        n_redraw = round(params.get("drop_ratio", 0.0) * d_ff)
        experts = []
        for _ in range(num_experts):
            redraw = torch.randperm(d_ff, generator=generator)[:n_redraw].sort().values if n_redraw else None
            experts.append(ExpertInit(units, redraw))
        return LayerSelection(experts, noise_std=params.get("noise_std", 0.0),
                              summary={"redrawn_units_per_expert": n_redraw})
