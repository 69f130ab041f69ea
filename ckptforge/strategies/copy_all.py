"""copy-all (sparse upcycling): every expert is the whole dense FFN.

Settings (:class:`~ckptforge.strategy_settings.CopyAllSettings`): ``noise_std`` (Gaussian noise on
every expert weight) and ``drop_ratio`` (Drop-Upcycling: each expert re-draws that fraction of its
hidden units, r = 0.5 in the paper).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch loads when a strategy selects units, not when a plan reads its metadata
    import torch

from ckptforge.strategy_settings import CopyAllSettings

from .base import DenseFFN, ExpertInit, LayerSelection, Strategy


class CopyAll(Strategy):
    name = "copy-all"
    settings = CopyAllSettings
    summary = "every expert copies the dense FFN (sparse upcycling); optional noise / Drop-Upcycling"

    def exact(self, params: dict[str, Any]) -> bool:
        settings = self.settings_of(params)
        return not settings.noise_std and not settings.drop_ratio

    def select(self, ffn: DenseFFN, num_experts: int, params: dict[str, Any], stats: Any,
               generator: torch.Generator) -> LayerSelection:
        import torch

        d_ff, settings = ffn.intermediate_size, self.settings_of(params)
        units = torch.arange(d_ff)
        n_redraw = round(settings.drop_ratio * d_ff)
        experts = []
        for _ in range(num_experts):
            redraw = torch.randperm(d_ff, generator=generator)[:n_redraw].sort().values if n_redraw else None
            experts.append(ExpertInit(units, redraw))
        return LayerSelection(experts, noise_std=settings.noise_std,
                              summary={"redrawn_units_per_expert": n_redraw})
